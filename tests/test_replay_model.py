"""The replay model: the stored answer is the one of the app inside the middleware.

Replays enter at the top of the app (as the server's requests do), outer layers add what
they always add to the scope, and the middleware captures its inner app's answer. These
tests pin the mechanics; tests/test_conformance.py compares whole frameworks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.core.freshness import lifetime
from asgi_worker.core.keys import InvalidHostError, RequestSnapshot, normalize_host
from asgi_worker.core.replay import replay
from asgi_worker.testing import run_pending

from .helpers import make_config

BACKENDS = ["memory", "redis"]


def backend_config(kind: str, prefix: str, **overrides: Any) -> Config:
    if kind == "memory":
        return Config(redis_url="memory://", prefix=prefix, **overrides)
    return make_config(prefix, **overrides)


class Outer:
    """An outer layer that appends a header and counts the requests it sees."""

    def __init__(self, app: ASGIApp, seen: Counter[str]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.seen["outer"] += 1
        scope.setdefault("state", {})["outer"] = "was here"

        async def appending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-outer", b"1")]}
            await send(message)

        await self.app(scope, receive, appending)


def layered_app(config: Config, seen: Counter[str]) -> Starlette:
    async def endpoint(request: Request) -> Response:
        seen["app"] += 1
        return JSONResponse({"outer": request.state.outer, "app": request.app is not None})

    app = Starlette(routes=[Route("/r", endpoint)])
    app.add_middleware(WorkerMiddleware, config=config)
    app.add_middleware(Outer, seen=seen)  # added last: outside WorkerMiddleware
    return app


async def get(app: ASGIApp, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(url, **kwargs)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_outer_layer_runs_once_per_served_response(
    kind: str, prefix: str, redis: Redis
) -> None:
    seen: Counter[str] = Counter()
    app = layered_app(backend_config(kind, prefix), seen)
    assert (await get(app, "/r")).status_code == 202
    assert await run_pending(app) == 1
    hit = await get(app, "/r")
    assert hit.headers["cache-status"] == "asgi-worker; hit"
    # Once from the replay (not stored) and once on the hit: never twice in one response.
    assert hit.headers.get_list("x-outer") == ["1"]
    # What the outer layer put in the scope reached the app in the replay.
    assert hit.json() == {"outer": "was here", "app": True}
    assert seen["app"] == 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_mounted_middleware_replays_through_the_served_app(
    kind: str, prefix: str, redis: Redis
) -> None:
    async def where(request: Request) -> Response:
        return JSONResponse({"base": str(request.base_url), "url": str(request.url_for("where"))})

    sub = Starlette(routes=[Route("/where", where, name="where")])
    sub.add_middleware(WorkerMiddleware, config=backend_config(kind, prefix))
    app = Starlette(routes=[Mount("/sub", app=sub)])
    direct = Starlette(
        routes=[Mount("/sub", app=Starlette(routes=[Route("/where", where, name="where")]))]
    )
    expected = (await get(direct, "/sub/where")).json()
    assert (await get(app, "/sub/where")).status_code == 202
    assert await run_pending(app) == 1
    hit = await get(app, "/sub/where")
    assert (hit.status_code, hit.headers["cache-status"]) == (200, "asgi-worker; hit")
    assert (
        hit.json()
        == expected
        == {
            "base": "http://testserver/",
            "url": "http://testserver/sub/where",
        }
    )


@pytest.mark.parametrize("kind", BACKENDS)
async def test_nested_middlewares_each_store_their_own_inner_answer(
    kind: str, prefix: str, redis: Redis
) -> None:
    inner_app = PlainTextResponse("inner")
    inner = WorkerMiddleware(inner_app, config=backend_config(kind, f"{prefix}-in"))
    outer = WorkerMiddleware(Outer(inner, Counter()), config=backend_config(kind, prefix))
    assert (await get(outer, "/x")).status_code == 202
    assert await run_pending(outer, outer.config) == 1
    # The outer middleware's replay passed through the inner one (a replay of another
    # prefix), and stored what its own inner app (Outer + inner middleware) answered.
    hit = await get(outer, "/x")
    assert (hit.text, hit.headers.get_list("x-outer")) == ("inner", ["1"])


async def test_replay_without_a_middleware_stores_what_the_app_answers() -> None:
    snapshot = RequestSnapshot("http", "example.com", "", "/", None, b"", ())
    answer = await replay(PlainTextResponse("bare"), snapshot, max_body_bytes=100, prefix="p")
    assert answer.body == b"bare"


@pytest.mark.parametrize(
    ("host", "scheme", "keyed"),
    [
        ("Example.COM", "http", "example.com"),
        ("example.com.", "http", "example.com"),
        ("example.com:80", "http", "example.com"),
        ("example.com:443", "https", "example.com"),
        ("example.com:443", "http", "example.com:443"),
        ("example.com:", "http", "example.com"),
        ("example.com:08080", "http", "example.com:8080"),
        ("example.org:000080", "http", "example.org"),
        ("example.org:0000000000000000000000000443", "https", "example.org"),
        ("example.org:00", "http", "example.org:0"),
        ("[::1]:8000", "http", "[::1]:8000"),
        ("[::1]", "https", "[::1]"),
        ("127.0.0.1", "http", "127.0.0.1"),
        ("xn--bcher-kva.example", "http", "xn--bcher-kva.example"),
    ],
)
def test_valid_hosts_are_normalised(host: str, scheme: str, keyed: str) -> None:
    assert normalize_host(host, scheme) == keyed


@pytest.mark.parametrize(
    "host",
    [
        "example.com:80x",
        "a:b:c",
        "127.0.0.1:8201.",
        "example.com:99999",
        "example.com:123456",
        "example.com:065536",
        "example.com:" + "9" * 5000,  # beyond int()'s digit limit: refused, no crash
        ".",
        "exa mple.com",
        "exa/mple",
        "user@example.com",
        "[::1",
        "::1",
        "\x00",
        "é.example",
    ],
)
def test_invalid_hosts_are_refused(host: str) -> None:
    with pytest.raises(InvalidHostError):
        normalize_host(host, "http")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_bad_host_is_400_with_no_job_and_spellings_share_one_entry(
    kind: str, prefix: str, redis: Redis
) -> None:
    seen: Counter[str] = Counter()
    app = layered_app(backend_config(kind, prefix), seen)
    for bad in ("example.com:80x", "a:b:c", "127.0.0.1:8201."):
        answer = await get(app, "/r", headers={"host": bad})
        assert (answer.status_code, answer.headers["cache-control"]) == (400, "no-store")
    assert await run_pending(app) == 0
    assert (await get(app, "/r", headers={"host": "example.com"})).status_code == 202
    assert await run_pending(app) == 1
    for spelling in ("EXAMPLE.com:80", "example.com.", "Example.Com", "example.com:000080"):
        hit = await get(app, "/r", headers={"host": spelling})
        assert hit.headers["cache-status"] == "asgi-worker; hit", spelling
    assert seen["app"] == 1


@pytest.mark.parametrize("vary", [b"*", b"Accept-Encoding, *", b" * "])
def test_vary_star_is_never_shared(vary: bytes) -> None:
    config = Config(redis_url="memory://")
    assert not lifetime(200, ((b"vary", vary),), "/", config).shared
    assert lifetime(200, ((b"vary", b"accept-encoding"),), "/", config).shared


@pytest.mark.parametrize("kind", BACKENDS)
async def test_vary_star_response_goes_to_the_app_every_time(
    kind: str, prefix: str, redis: Redis
) -> None:
    runs: Counter[str] = Counter()

    async def anything(request: Request) -> Response:
        runs["app"] += 1
        return PlainTextResponse(str(runs["app"]), headers={"vary": "*"})

    app = Starlette(routes=[Route("/v", anything)])
    app.add_middleware(WorkerMiddleware, config=backend_config(kind, prefix))
    assert (await get(app, "/v")).status_code == 202
    assert await run_pending(app) == 1
    first, second = await get(app, "/v"), await get(app, "/v")
    assert "cache-status" not in first.headers
    assert (first.text, second.text) == ("2", "3")  # the app answered each one
