"""Finding the WorkerMiddleware (and its Config) inside the app you serve, in every shape."""

from __future__ import annotations

import httpx
import pytest
from litestar import Litestar, get
from litestar.middleware import DefineMiddleware
from quart import Quart
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route

from asgi_worker import Config, ConfigurationError, WorkerMiddleware
from asgi_worker.core.discovery import config_mismatch, find_all, find_config
from asgi_worker.invalidation import Invalidator
from asgi_worker.testing import find_middleware, run_pending

CONFIG = Config(redis_url="memory://", prefix="found")


def starlette_app(config: Config = CONFIG) -> Starlette:
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("hi"))])
    app.add_middleware(GZipMiddleware)
    app.add_middleware(WorkerMiddleware, config=config)
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    return app


def test_found_through_an_unbuilt_starlette_stack() -> None:
    app = starlette_app()
    assert app.middleware_stack is None  # never served a request
    middleware = find_middleware(app)
    assert isinstance(middleware, WorkerMiddleware)
    assert middleware.config is CONFIG
    # Built as Starlette builds it: the instance found is the one requests will reach.
    assert find_middleware(app) is middleware


def test_found_through_mounts_and_hosts_and_marked_mounted() -> None:
    sub = starlette_app()
    outer = Starlette(routes=[Mount("/sub", app=sub), Host("api.example.com", app=Starlette())])
    (found,) = find_all(outer, WorkerMiddleware)
    assert found.mounted
    assert find_all(sub, WorkerMiddleware)[0].mounted is False
    via_host = Starlette(routes=[Host("api.example.com", app=starlette_app())])
    assert find_all(via_host, WorkerMiddleware)[0].mounted is False


def test_found_in_a_plain_wrapper_and_quart_asgi_app() -> None:
    assert find_middleware(WorkerMiddleware(PlainTextResponse("x"), config=CONFIG)) is not None
    quart = Quart(__name__)
    assert find_middleware(quart) is None
    quart.asgi_app = WorkerMiddleware(quart.asgi_app, config=CONFIG)  # type: ignore[method-assign]
    assert find_config(quart) is CONFIG


def litestar_app(config: Config) -> Litestar:
    @get("/a")
    async def first() -> str:
        return "a"

    @get("/b")
    async def second() -> str:
        return "b"

    return Litestar([first, second], middleware=[DefineMiddleware(WorkerMiddleware, config=config)])


async def test_litestar_instances_per_route_handler_share_one_store() -> None:
    app = litestar_app(CONFIG)
    found = find_all(app, WorkerMiddleware)
    # Several per handler (one per method it answers, HEAD and OPTIONS included).
    assert len({id(f.middleware) for f in found}) >= 4
    assert find_config(app) is CONFIG
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/a")).status_code == 202
        assert (await client.get("/b")).status_code == 202
        assert await run_pending(app) == 2
        hit = await client.get("/b")
        assert (hit.text, hit.headers["cache-status"]) == ("b", "asgi-worker; hit")
    # Each route's middleware served; the second took the first one's backend.
    serving = [f.middleware for f in found if f.middleware.opened]
    assert len(serving) == 2
    assert len({id(middleware.store) for middleware in serving}) == 1
    assert len(Invalidator.for_app(app)._stores) == 1


def test_redis_stores_of_many_instances_are_invalidated_once() -> None:
    app = litestar_app(Config(redis_url="redis://127.0.0.1:6379/0", prefix="found-once"))
    assert len(find_all(app, WorkerMiddleware)) >= 2
    assert len(Invalidator.for_app(app)._stores) == 1


def test_no_middleware_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match=r"no WorkerMiddleware found .*--config"):
        find_config(Starlette())
    with pytest.raises(LookupError, match="no WorkerMiddleware"):
        Invalidator.for_app(Starlette())


def test_two_different_configs_are_a_clear_error() -> None:
    outer = Starlette(
        routes=[
            Mount("/a", app=starlette_app(CONFIG)),
            Mount("/b", app=starlette_app(Config(redis_url="memory://", prefix="other"))),
        ]
    )
    with pytest.raises(ConfigurationError, match="'found', 'other'"):
        find_config(outer)


def test_mismatch_names_both_prefixes() -> None:
    app = starlette_app()
    assert config_mismatch(app, CONFIG) is None
    warning = config_mismatch(app, Config(redis_url="memory://", prefix="aw"))
    assert warning is not None
    assert "'aw'" in warning
    assert "'found'" in warning
    assert "no WorkerMiddleware" in (config_mismatch(Starlette(), CONFIG) or "")


def test_mismatch_says_what_is_wrong_and_what_to_do() -> None:
    warning = config_mismatch(starlette_app(), Config(redis_url="memory://", prefix="aw"))
    assert warning == (
        "this worker's Config (prefix 'aw', queue 'aw:queue') does not match the "
        "WorkerMiddleware in the app (prefix 'found', queue 'found:queue'), so this worker "
        "will never run that middleware's jobs: its requests get 202 until a worker with "
        "its Config runs. Give the worker the middleware's Config, or none (no --config "
        "and no ASGI_WORKER_* variables; config=None in Python) to take it from the app."
    )


def test_a_cycle_or_odd_attributes_do_not_hang_the_walk() -> None:
    class Loop:
        def __init__(self) -> None:
            self.app = self

        async def __call__(self, scope: object, receive: object, send: object) -> None:
            raise AssertionError

    class Broken:
        @property
        def app(self) -> object:
            raise RuntimeError("not ours to break on")

    assert find_middleware(Loop()) is None  # type: ignore[arg-type]
    assert find_middleware(Broken()) is None  # type: ignore[arg-type]
