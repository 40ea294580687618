"""Cache poisoning: headers outside the key cannot shape what everyone else is served.

The key holds scheme, host, root path, path, query and the `vary` headers, and the worker
replays exactly those (docs/requests.md). So a cold request dressed
up with `X-Forwarded-Host`, `X-Original-URL`, a `User-Agent`, ... starts the one job for
its URL, but the job never sees those headers, and the stored response is what a plain
request would have produced. A header a server turns into a keyed part (uvicorn's
`--proxy-headers` turns a trusted `X-Forwarded-Proto` into `scope["scheme"]`) makes a
key of its own and never touches the plain one.

The client's address is the one unkeyed part a replay carries (`Config.replay_client`,
on by default): behind a trusted proxy, the server makes it from `X-Forwarded-For`. These
tests turn it off, so that nothing unkeyed at all reaches a stored answer; with it on,
the address is the enqueuing client's and nothing else changes (the last test).

First against real uvicorn and `asgi-worker worker` subprocesses, then (faster) at the
ASGI level on every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.testing import run_pending

from .helpers import backend_config, reflection
from .stack import HIT, MISS, Stack, get_until_ready, running_stack

# Headers a poisoner sends with the cold request. None of them is keyed by default.
EVIL = {
    "X-Forwarded-Host": "evil.example",
    "X-Host": "evil.example",
    "X-Forwarded-Server": "evil.example",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Port": "666",
    "X-Forwarded-Prefix": "/evil",
    "Forwarded": "for=6.6.6.6;host=evil.example",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-HTTP-Method-Override": "POST",
    "User-Agent": "evil",
    "Accept-Language": "xx-EVIL",
    "Accept-Encoding": "evil",
    "Referer": "https://evil.example/",
}
EVIL_VALUES = ("evil", "admin", "6.6.6.6", "xx-EVIL")


def clean(url: str, **changes: Any) -> dict[str, Any]:
    """What `/reflect` answers when it sees no unkeyed header and no client (a replay)."""
    return {
        "url": url,
        "x-forwarded-host": None,
        "x-forwarded-proto": None,
        "x-original-url": None,
        "user-agent": None,
        "accept-language": None,
        "client": None,
        **changes,
    }


def assert_no_evil(response: httpx.Response) -> None:
    served = (response.text + repr(sorted(response.headers.items()))).lower()
    for value in EVIL_VALUES:
        assert value.lower() not in served, (value, response.text, response.headers)


# --- real uvicorn and worker ------------------------------------------------------------------


@pytest.fixture
def stack(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(prefix, tmp_path, replay_client="false") as running:
        yield running


@pytest.mark.e2e
async def test_e2e_unkeyed_headers_do_not_reach_the_stored_response(stack: Stack) -> None:
    url = "/reflect?case=headers"
    async with stack.client() as http:
        cold = await http.get(url, headers=EVIL)
        assert cold.status_code == 202
        assert cold.headers["cache-status"] == MISS

        plain = await get_until_ready(http, url, within=15)
        assert plain.status_code == 200
        assert plain.headers["cache-status"] == HIT
        assert plain.json() == clean(f"{stack.base_url}{url}")
        assert_no_evil(plain)

        # The poisoner itself is served the same entry: its headers are simply not keyed.
        again = await http.get(url, headers=EVIL)
    assert again.status_code == 200
    assert again.headers["cache-status"] == HIT
    assert again.content == plain.content
    assert stack.runs("/reflect") == 1


@pytest.mark.e2e
async def test_e2e_forwarded_proto_makes_its_own_key(stack: Stack) -> None:
    # uvicorn (--proxy-headers is its default, 127.0.0.1 is trusted) turns this header
    # into scope["scheme"] = "https": a keyed part, so a separate entry.
    url = "/reflect?case=proto"
    https = {"X-Forwarded-Proto": "https"}
    async with stack.client() as http:
        assert (await http.get(url, headers=https)).status_code == 202
        forwarded = await get_until_ready(http, url, within=15, headers=https)
        assert forwarded.json() == clean(f"https://{stack.base_url.removeprefix('http://')}{url}")

        # The plain URL was never stored: a cold miss of its own, never the https entry.
        plain_cold = await http.get(url)
        assert plain_cold.status_code == 202
        assert plain_cold.headers["cache-status"] == MISS
        plain = await get_until_ready(http, url, within=15)
    assert plain.json() == clean(f"{stack.base_url}{url}")
    assert stack.runs("/reflect") == 2


@pytest.mark.e2e
async def test_e2e_foreign_host_makes_its_own_key(stack: Stack) -> None:
    url = "/reflect?case=host"
    async with stack.client() as http:
        assert (await http.get(url, headers={"Host": "evil.example"})).status_code == 202
        foreign = await get_until_ready(http, url, within=15, headers={"Host": "evil.example"})
        assert foreign.json() == clean(f"http://evil.example{url}")

        plain_cold = await http.get(url)
        assert plain_cold.status_code == 202
        plain = await get_until_ready(http, url, within=15)
    assert plain.json() == clean(f"{stack.base_url}{url}")
    assert_no_evil(plain)
    assert stack.runs("/reflect") == 2


# --- ASGI level, every backend ----------------------------------------------------------------

BASE = "http://testserver"


async def reflect(request: Request) -> Response:
    return JSONResponse(reflection(request))


async def admin(request: Request) -> Response:
    return JSONResponse({"admin": "the admin page"})


class HonourOriginalUrl:
    """A middleware of the kind that makes poisoning possible: it believes the client's
    `X-Original-URL` and routes by it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-original-url":
                    scope = {**scope, "path": value.decode("latin-1"), "raw_path": value}
        await self.app(scope, receive, send)


def routes_app() -> Starlette:
    return Starlette(routes=[Route("/reflect", reflect), Route("/admin", admin)])


def cached(config: Config, *, rewrite: str | None = None) -> tuple[ASGIApp, ASGIApp]:
    """(what the server runs, what the worker replays through).

    `rewrite="inside"` puts `HonourOriginalUrl` between the middleware and the routes
    (replays go through it too); `"outside"` puts it in front of the middleware.
    The server side also runs uvicorn's proxy-headers middleware, trusting 127.0.0.1
    (httpx's ASGITransport client address).
    """
    config = dataclasses.replace(config, replay_client=False)
    inner: ASGIApp = routes_app()
    if rewrite == "inside":
        inner = HonourOriginalUrl(inner)
    app: ASGIApp = WorkerMiddleware(inner, config=config)
    if rewrite == "outside":
        app = HonourOriginalUrl(app)
    proxy = ProxyHeadersMiddleware(cast(Any, app), trusted_hosts="127.0.0.1")
    return cast(ASGIApp, proxy), app


async def open_client(server_app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(server_app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url=BASE) as http,
    ):
        yield http


async def ready(
    http: httpx.AsyncClient, replay_app: ASGIApp, url: str, **options: Any
) -> httpx.Response:
    """Run the pending jobs, then GET: the stored response."""
    await run_pending(replay_app)
    response = await http.get(url, **options)
    assert response.status_code == 200, response
    assert response.headers["cache-status"] == HIT
    return response


async def test_unkeyed_headers_do_not_reach_the_stored_response(kind: str, config: Config) -> None:
    server_app, replay_app = cached(backend_config(kind, config))
    async for http in open_client(server_app):
        cold = await http.get("/reflect?case=1", headers=EVIL)
        assert cold.status_code == 202
        plain = await ready(http, replay_app, "/reflect?case=1")
        assert plain.json() == clean(f"{BASE}/reflect?case=1")
        assert_no_evil(plain)
        evil_again = await http.get("/reflect?case=1", headers=EVIL)
        assert evil_again.content == plain.content


@pytest.mark.parametrize("name", sorted(EVIL))
async def test_each_unkeyed_header_alone_shares_the_plain_entry(config: Config, name: str) -> None:
    memory = dataclasses.replace(config, redis_url="memory://")
    server_app, replay_app = cached(memory)
    async for http in open_client(server_app):
        assert (await http.get("/reflect", headers={name: EVIL[name]})).status_code == 202
        plain = await ready(http, replay_app, "/reflect")
        assert plain.json() == clean(f"{BASE}/reflect")


async def test_forwarded_proto_is_keyed_apart_from_the_plain_url(kind: str, config: Config) -> None:
    server_app, replay_app = cached(backend_config(kind, config))
    https = {"X-Forwarded-Proto": "https"}
    async for http in open_client(server_app):
        assert (await http.get("/reflect?p=1", headers=https)).status_code == 202
        secure = await ready(http, replay_app, "/reflect?p=1", headers=https)
        assert secure.json() == clean("https://testserver/reflect?p=1")

        assert (await http.get("/reflect?p=1")).status_code == 202  # not the https entry
        plain = await ready(http, replay_app, "/reflect?p=1")
        assert plain.json() == clean(f"{BASE}/reflect?p=1")
        # And the https entry is still its own.
        assert (await http.get("/reflect?p=1", headers=https)).content == secure.content


async def test_https_request_and_plain_request_are_separate_entries(
    kind: str, config: Config
) -> None:
    # The same, with the scheme set by the server itself (TLS), no proxy header involved.
    server_app, replay_app = cached(backend_config(kind, config))
    async for http in open_client(server_app):
        assert (await http.get("https://testserver/reflect")).status_code == 202
        secure = await ready(http, replay_app, "https://testserver/reflect")
        assert secure.json() == clean("https://testserver/reflect")
        assert (await http.get("http://testserver/reflect")).status_code == 202


@pytest.mark.parametrize("where", ["inside", "outside"])
async def test_a_middleware_honouring_x_original_url_cannot_poison(
    kind: str, config: Config, where: str
) -> None:
    server_app, replay_app = cached(backend_config(kind, config), rewrite=where)
    async for http in open_client(server_app):
        cold = await http.get("/reflect", headers={"X-Original-URL": "/admin"})
        assert cold.status_code == 202
        await run_pending(replay_app)
        plain = await http.get("/reflect")
        if where == "inside":
            # The one job for /reflect never saw the header: the stored /reflect is clean.
            assert plain.status_code == 200
            assert plain.json() == clean(f"{BASE}/reflect")
        else:
            # Rewritten before the key was made: that request was for /admin all along.
            assert plain.status_code == 202
            await run_pending(replay_app)
            assert (await http.get("/reflect")).json() == clean(f"{BASE}/reflect")
            assert (await http.get("/admin")).json() == {"admin": "the admin page"}
        assert "admin" not in (await http.get("/reflect")).text


async def test_vary_header_is_keyed_and_replayed_the_others_are_not(
    kind: str, config: Config
) -> None:
    server_app, replay_app = cached(backend_config(kind, config, vary=("accept-language",)))
    async for http in open_client(server_app):
        german = {**EVIL, "Accept-Language": "de"}
        assert (await http.get("/reflect", headers=german)).status_code == 202
        stored = await ready(http, replay_app, "/reflect", headers={"Accept-Language": "de"})
        assert stored.json() == clean(f"{BASE}/reflect", **{"accept-language": "de"})

        # Another value, or none, is another key: never served the German entry.
        assert (await http.get("/reflect", headers={"Accept-Language": "fr"})).status_code == 202
        assert (await http.get("/reflect")).status_code == 202
        plain = await ready(http, replay_app, "/reflect")
        assert plain.json() == clean(f"{BASE}/reflect")


async def test_with_replay_client_on_only_the_enqueuing_clients_address_comes_along(
    config: Config,
) -> None:
    app = routes_app()
    app.add_middleware(WorkerMiddleware, config=dataclasses.replace(config, redis_url="memory://"))
    proxy = cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, app), trusted_hosts="127.0.0.1"))
    async for http in open_client(proxy):
        assert (await http.get("/reflect", headers=EVIL)).status_code == 202
        plain = await ready(http, app, "/reflect")
        # The trusted proxy's X-Forwarded-For is the client's address (uvicorn's reading
        # of it), as the app would see it served directly; no other header came along.
        assert plain.json() == clean(f"{BASE}/reflect", client=["6.6.6.6", 0])
