"""Helpers shared by the unit, middleware and fault tests (apps, clients, Redis probes)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.keys import RedisKeys, snapshot_from_scope
from asgi_worker.testing import worker_running

from .conftest import REDIS_URL

BASE_URL = "http://testserver"
SECRET = "secret detail that must not reach a client"


def make_config(prefix: str, **overrides: Any) -> Config:
    """A Config on the test Redis under `prefix`; keyword arguments override the defaults."""
    values: dict[str, Any] = {"redis_url": REDIS_URL, "prefix": prefix, "ttl": 60, "retry_after": 1}
    values.update(overrides)
    return Config(**values)


class RawASGI:
    """Wraps a plain ASGI callable so a Starlette `Route` passes it scope/receive/send."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


async def _body_before_start(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.body", "body": b"too early"})


def build_app(
    config: Config | None,
    calls: Counter[str] | None = None,
    *,
    slow_seconds: float = 5.0,
    big_bytes: int = 4096,
) -> Starlette:
    """A Starlette app (behind the middleware if `config` is given) with one route per case.

    `calls` counts how often each path ran in the app itself (web side or replay).
    """
    counted: Counter[str] = Counter() if calls is None else calls

    async def echo(request: Request) -> Response:
        counted[request.url.path] += 1
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "headers": dict(request.headers),
                "started": getattr(request.state, "started", None),
            },
            headers={"x-app": "echo"},
        )

    async def stream(request: Request) -> Response:
        counted[request.url.path] += 1

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(4):
                await asyncio.sleep(0)
                yield f"part{index};".encode()

        return StreamingResponse(chunks(), media_type="text/plain", status_code=203)

    async def boom(request: Request) -> Response:
        counted[request.url.path] += 1
        raise RuntimeError(SECRET)

    async def slow(request: Request) -> Response:
        counted[request.url.path] += 1
        await asyncio.sleep(slow_seconds)
        return PlainTextResponse("finally")

    async def big(request: Request) -> Response:
        counted[request.url.path] += 1
        return PlainTextResponse("x" * big_bytes)

    async def unavailable(request: Request) -> Response:
        counted[request.url.path] += 1
        return PlainTextResponse("app says 503", status_code=503)

    async def bad(scope: Scope, receive: Receive, send: Send) -> None:
        counted[scope["path"]] += 1
        await _body_before_start(scope, receive, send)

    async def post(request: Request) -> Response:
        counted[request.url.path] += 1
        return PlainTextResponse(f"{request.method} ran", status_code=201)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"started": True}

    app = Starlette(
        routes=[
            Route("/echo", echo),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/slow", slow),
            Route("/big", big),
            Route("/unavailable", unavailable),
            Route("/bad", RawASGI(bad)),
            Route("/post", post, methods=["POST", "PUT"]),
        ],
        lifespan=lifespan,
    )
    if config is not None:
        app.add_middleware(WorkerMiddleware, config=config)
    return app


@asynccontextmanager
async def serve(app: ASGIApp, *, worker: Config | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on `app`, with the app's lifespan run around it (closes the backend).

    The server's part: in-process replays get the lifespan state, as under uvicorn. With
    `worker`, jobs also run as they arrive (a real arq worker in this loop for arq).
    """
    async with (
        LifespanManager(app) as manager,
        worker_running(app, worker) if worker is not None else nullcontext(),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url=BASE_URL, timeout=30
        ) as http,
    ):
        yield http


def backend_config(kind: str, base: Config, **changes: Any) -> Config:
    """`base` moved onto the backend `kind`, with `changes` applied.

    `cluster` is arq's: its store URL is set by conftest's `config`.
    """
    if kind == "memory":
        changes.setdefault("redis_url", "memory://")
    elif kind == "inline":
        changes.setdefault("inline_worker", True)
    return dataclasses.replace(base, **changes)


async def scope_of(
    url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> Scope:
    """The scope httpx's ASGI transport gives an app for this request."""
    seen: list[Scope] = []

    async def record(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    transport = httpx.ASGITransport(app=record)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http:
        await http.request(method, url, headers=headers)
    return seen[0]


async def digest_of(
    config: Config, url: str, *, method: str = "GET", headers: dict[str, str] | None = None
) -> str:
    """The cache digest the middleware computes for this httpx request (same scope builder)."""
    scope = await scope_of(url, method=method, headers=headers)
    return snapshot_from_scope(scope, config.vary).digest


async def queued(redis: Redis, config: Config) -> int:
    """How many jobs wait in the arq queue of `config`."""
    return int(await redis.zcard(config.queue))


async def claim_keys(redis: Redis, prefix: str) -> list[bytes]:
    """Every claim key under `prefix`."""
    return [key async for key in redis.scan_iter(match=f"{prefix}:*:claim", count=1000)]


async def wait_until_gone(redis: Redis, key: str, within: float = 5.0) -> None:
    """Wait for `key` to expire; fail if it is still there after `within` seconds."""
    deadline = time.monotonic() + within
    while await redis.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {within}s"
        await asyncio.sleep(0.02)


def response_key(config: Config, digest: str) -> str:
    return RedisKeys(config.prefix).response(digest)


def fresh_key(config: Config, digest: str) -> str:
    return RedisKeys(config.prefix).fresh(digest)


def claim_key(config: Config, digest: str) -> str:
    return RedisKeys(config.prefix).claim(digest)


def reflection(request: Request) -> dict[str, Any]:
    """Everything a poisoning attempt could try to smuggle into a shared response."""
    client = request.client
    return {
        "url": str(request.url),
        "x-forwarded-host": request.headers.get("x-forwarded-host"),
        "x-forwarded-proto": request.headers.get("x-forwarded-proto"),
        "x-original-url": request.headers.get("x-original-url"),
        "user-agent": request.headers.get("user-agent"),
        "accept-language": request.headers.get("accept-language"),
        "client": None if client is None else [client.host, client.port],
    }
