"""The app the end-to-end tests serve with uvicorn and replay in `asgi-worker worker`.

Configured only from `ASGI_WORKER_*` variables (`Config.from_env()`), so the web process
and the worker process agree on Redis and the key prefix. Every endpoint counts its runs
in Redis (`<prefix>:runs:<path>`), so a test can see how often a body really ran across
both processes; the Redis client comes from the lifespan state, so a replay that counts
also proves the worker ran the lifespan and handed its state to the request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware

from .helpers import reflection

config = Config.from_env()

SLOW_SECONDS = 0.3


def runs_key(prefix: str, path: str) -> str:
    """The Redis counter of how many times the endpoint at `path` ran."""
    return f"{prefix}:runs:{path}"


def runs_by_url_key(prefix: str) -> str:
    """The Redis hash of how many times `/hang` ran, per path and query string."""
    return f"{prefix}:runs-by-url"


# The longest `/hang` sleeps, whatever its query asks for.
MAX_HANG_SECONDS = 30.0


async def _count(request: Request) -> int:
    redis: Redis = request.state.redis
    runs: int = await redis.incr(runs_key(request.state.prefix, request.url.path))
    return runs


async def slow(request: Request) -> Response:
    """A slow GET, the kind of endpoint the worker pattern is for."""
    runs = await _count(request)
    await asyncio.sleep(SLOW_SECONDS)
    return JSONResponse(
        {"path": request.url.path, "query": request.url.query, "pid": os.getpid(), "run": runs},
        headers={"x-app": "slow"},
    )


async def whoami(request: Request) -> Response:
    """What the app saw of the client's credentials (only reached by pass-through)."""
    runs = await _count(request)
    return JSONResponse(
        {
            "authorization": request.headers.get("authorization"),
            "cookie": request.headers.get("cookie"),
            "pid": os.getpid(),
            "run": runs,
        }
    )


async def create_item(request: Request) -> Response:
    """A POST: never cached, always the app."""
    runs = await _count(request)
    body = await request.body()
    return JSONResponse(
        {"received": body.decode(), "pid": os.getpid(), "run": runs}, status_code=201
    )


async def reflect(request: Request) -> Response:
    """Everything a poisoning attempt could try to smuggle into a shared response."""
    await _count(request)
    return JSONResponse(reflection(request))


async def hang(request: Request) -> Response:
    """Counts its run on entry (per path and per URL), then sleeps `?seconds=` (float).

    With `?block=1` it sleeps holding the event loop (CPU work in an `async def`
    endpoint looks like that); `?kib=N` pads the answer to about N KiB (at most 1024).
    """
    runs = await _count(request)
    redis: Redis = request.state.redis
    url = f"{request.url.path}?{request.url.query}"
    await redis.hincrby(runs_by_url_key(request.state.prefix), url, 1)
    seconds = min(float(request.query_params.get("seconds", "0")), MAX_HANG_SECONDS)
    if request.query_params.get("block") == "1":
        time.sleep(seconds)  # noqa: ASYNC251  # holding the loop is the point
    else:
        await asyncio.sleep(seconds)
    answer: dict[str, Any] = {"url": url, "pid": os.getpid(), "run": runs}
    if "kib" in request.query_params:
        answer["pad"] = "x" * 1024 * min(int(request.query_params["kib"]), 1024)
    return JSONResponse(answer)


async def events(request: Request) -> Response:
    """An endless event stream (server-sent events), one event every 50 ms."""
    await _count(request)

    async def ticks() -> AsyncIterator[str]:
        for number in itertools.count():
            yield f"data: tick {number}\n\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(ticks(), media_type="text/event-stream")


async def feed(request: Request) -> Response:
    """An endless newline-delimited JSON feed: not an event stream by its type."""
    await _count(request)

    async def lines() -> AsyncIterator[bytes]:
        for number in itertools.count():
            yield json.dumps({"n": number}).encode() + b"\n"
            await asyncio.sleep(0.05)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def client(request: Request) -> Response:
    """The client's address as the app sees it."""
    await _count(request)
    address = request.client
    return JSONResponse(None if address is None else {"host": address.host, "port": address.port})


LIVE_PAGE = """<!doctype html>
<title>live</title>
<ol id="events"></ol>
<script>
  const source = new EventSource("/events");
  source.onmessage = (event) => {
    const item = document.createElement("li");
    item.textContent = event.data;
    document.getElementById("events").append(item);
  };
</script>
"""


async def live_page(request: Request) -> Response:
    """A page whose `EventSource` reads /events (served with /live.html excluded)."""
    return HTMLResponse(LIVE_PAGE)


async def health(request: Request) -> Response:
    """Readiness probe; excluded from the worker via ASGI_WORKER_EXCLUDE, counts nothing."""
    return PlainTextResponse("ok")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    # Runs are counted on the test's Redis, also when the cache is memory://.
    redis = Redis.from_url(os.environ.get("AW_E2E_COUNTS_URL") or config.redis_url)
    try:
        yield {"redis": redis, "prefix": config.prefix}
    finally:
        await redis.aclose()


app = Starlette(
    routes=[
        Route("/slow", slow),
        Route("/whoami", whoami),
        Route("/items", create_item, methods=["POST"]),
        Route("/health", health),
        Route("/reflect", reflect),
        Route("/hang", hang),
        Route("/events", events),
        Route("/feed", feed),
        Route("/client", client),
        Route("/live.html", live_page),
    ],
    lifespan=lifespan,
)
app.add_middleware(WorkerMiddleware, config=config)
