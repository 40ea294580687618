"""The apps the benchmark serves with uvicorn (one process per app, loopback).

Every app answers `GET /item` with the same 1 KiB JSON body (`PAYLOAD`), so the numbers
compare the cost of getting that body out of Redis and onto the wire, nothing else:

| name              | what it is                                                         |
| ----------------- | ------------------------------------------------------------------ |
| `bare`            | raw ASGI, the body from memory: the ceiling                        |
| `redis_floor`     | raw ASGI, one `GET` of a msgpack `{status, headers, body}` blob    |
| `asgi_worker_app` | Starlette behind `WorkerMiddleware` (`Config.from_env()`)          |

The peers (fastapi-cache2, cashews) are in `peers.py`, so the processes serving these
apps do not import them.

Configured from the environment only, so the web process, the worker process and the
orchestrator agree: `BENCH_REDIS_URL`, `BENCH_PREFIX` (every key this run writes starts
with it) and, for asgi-worker, the usual `ASGI_WORKER_*` variables.
"""

from __future__ import annotations

import asyncio
import json
import os

import msgpack
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PREFIX", "awbench")


def _payload(size: int) -> dict[str, str]:
    """A JSON object whose compact encoding is exactly `size` bytes."""
    empty = len(json.dumps({"data": ""}, separators=(",", ":")))
    return {"data": "x" * (size - empty)}


DATA = _payload(1024)
PAYLOAD = json.dumps(DATA, separators=(",", ":")).encode()
assert len(PAYLOAD) == 1024
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"1024")]


def floor_key(prefix: str = PREFIX) -> str:
    """The Redis key the `redis_floor` app reads."""
    return f"{prefix}:floor"


def floor_blob(body: bytes = PAYLOAD, headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The msgpack `{status, headers, body}` blob the `redis_floor` app serves."""
    pairs = JSON_HEADERS if headers is None else headers
    return msgpack.packb(  # type: ignore[no-any-return]
        {"status": 200, "headers": [list(pair) for pair in pairs], "body": body},
        use_bin_type=True,
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    """A minimal lifespan for the raw apps: nothing to start, nothing to stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------- 1. bare: the ceiling


async def bare(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: the 1 KiB body from memory, for every path."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": PAYLOAD})


# ---------------------------------------------------------------- 2. redis-floor


class RedisFloor:
    """Raw ASGI: one `GET` (redis.asyncio + hiredis) and a msgpack decode per request."""

    def __init__(self) -> None:
        self._redis: Redis | None = None
        self._key = floor_key()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            if self._redis is not None:
                await self._redis.aclose()
            return
        if self._redis is None:
            self._redis = Redis.from_url(REDIS_URL)
        blob = await self._redis.get(self._key)
        if blob is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        entry = msgpack.unpackb(blob)
        await send(
            {
                "type": "http.response.start",
                "status": entry["status"],
                "headers": entry["headers"],
            }
        )
        await send({"type": "http.response.body", "body": entry["body"]})


redis_floor = RedisFloor()


# ---------------------------------------------------------------- 3. asgi-worker


async def item(request: Request) -> Response:
    """The benchmarked endpoint: the same 1 KiB JSON body."""
    return Response(PAYLOAD, media_type="application/json")


async def trivial(request: Request) -> Response:
    """A trivial endpoint (time-to-ready, worker throughput)."""
    return PlainTextResponse("ok")


async def blob(request: Request) -> Response:
    """A body of `?size=` bytes (storage per entry)."""
    size = int(request.query_params.get("size", "1024"))
    return Response(b"x" * size, media_type="application/octet-stream")


async def slow(request: Request) -> Response:
    """An endpoint that takes `BENCH_SLOW_SECONDS` (1 s): the flood's target and its victim."""
    await asyncio.sleep(float(os.environ.get("BENCH_SLOW_SECONDS", "1")))
    return PlainTextResponse(request.url.path)


async def health(request: Request) -> Response:
    """Readiness probe (excluded from the middleware by the orchestrator's config)."""
    return PlainTextResponse("ok")


def create_asgi_worker_app(config: Config) -> Starlette:
    """A Starlette app behind `WorkerMiddleware`."""
    app = Starlette(
        routes=[
            Route("/item", item),
            Route("/trivial", trivial),
            Route("/blob", blob),
            Route("/slow", slow),
            Route("/other", slow),
            Route("/health", health),
        ]
    )
    app.add_middleware(WorkerMiddleware, config=config)
    return app


def _asgi_worker_app_from_env() -> Starlette | None:
    # Only build it where the orchestrator set a prefix: importing this module for the
    # other apps must not need (or validate) asgi-worker settings.
    if "ASGI_WORKER_PREFIX" not in os.environ:
        return None
    return create_asgi_worker_app(Config.from_env())


asgi_worker_app = _asgi_worker_app_from_env()
