"""The peers, on the same endpoint as `apps.py`: FastAPI + fastapi-cache2, FastAPI + cashews.

Both use their Redis backend with their defaults, and the endpoint returns the same 1 KiB
JSON object (`apps.DATA`). The orchestrator prewarms them, so every request of the load
phase is a hit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cashews import Cache
from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.backends.redis import RedisBackend
from fastapi_cache.decorator import cache as fastapi_cache
from redis.asyncio import Redis
from starlette.responses import PlainTextResponse, Response

from benchmarks.apps import DATA, PREFIX, REDIS_URL

PEER_TTL_SECONDS = 3600  # longer than any run: every request of the load phase is a hit


# ---------------------------------------------------------------- fastapi-cache2


@asynccontextmanager
async def _fastapi_cache_lifespan(app: FastAPI) -> AsyncIterator[None]:
    redis = Redis.from_url(REDIS_URL)
    FastAPICache.init(RedisBackend(redis), prefix=f"{PREFIX}:fc")
    try:
        yield
    finally:
        await redis.aclose()


fastapi_cache_app = FastAPI(lifespan=_fastapi_cache_lifespan)


# No return annotation on the peers' endpoints: FastAPI then skips response-model
# validation, the cheapest way to serve a dict. The peers get their best case.
@fastapi_cache_app.get("/item")
@fastapi_cache(expire=PEER_TTL_SECONDS)
async def fastapi_cache_item():  # type: ignore[no-untyped-def]
    return DATA


@fastapi_cache_app.get("/health")
async def fastapi_cache_health() -> Response:
    return PlainTextResponse("ok")


# ---------------------------------------------------------------- cashews
#
# cashews' `@cache` defaults to `protected=True` ("thunder protection"): concurrent calls
# with the same key in one process share one in-flight lookup, so under 32 connections
# to one URL most requests never reach Redis. `cashews_app` keeps that default;
# `cashews_unprotected_app` sets `protected=False`: one Redis GET per request, the same
# work as every other app here.

cashews = Cache()
cashews.setup(REDIS_URL)  # cashews' defaults for its redis backend


@asynccontextmanager
async def _cashews_lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await cashews.close()


def cashews_key(prefix: str = PREFIX, *, protected: bool = True) -> str:
    """The Redis key cashews stores `/item` under."""
    return f"{prefix}:cx:item" if protected else f"{prefix}:cx-unprotected:item"


def _cashews_app(*, protected: bool) -> FastAPI:
    app = FastAPI(lifespan=_cashews_lifespan)

    @app.get("/item")
    @cashews(ttl=PEER_TTL_SECONDS, key=cashews_key(protected=protected), protected=protected)
    async def cashews_item():  # type: ignore[no-untyped-def]
        return DATA

    @app.get("/health")
    async def cashews_health() -> Response:
        return PlainTextResponse("ok")

    return app


cashews_app = _cashews_app(protected=True)
cashews_unprotected_app = _cashews_app(protected=False)
