"""A backend is a `Store` and a `JobQueue` that belong together, and the connections under them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool

from .config import Config
from .queue import ArqQueue, JobQueue
from .store import RedisStore, Store


@dataclass(frozen=True, slots=True)
class Backend:
    """What the middleware needs: where entries live and where jobs go."""

    store: Store
    queue: JobQueue
    close: Callable[[], Awaitable[None]]
    """Releases the connections under both."""


def redis_client(url: str, config: Config) -> ArqRedis:
    """A client for `url` that gives up after `config.redis_timeout` seconds."""
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=config.redis_timeout,
        socket_connect_timeout=config.redis_timeout,
    )
    return ArqRedis(pool_or_conn=pool, default_queue_name=config.queue)


def redis_backend(config: Config) -> Backend:
    """The Redis store and arq queue; one connection pool when both use the same URL."""
    cache = redis_client(config.redis_url, config)
    queue_url = config.queue_redis_url or config.redis_url
    queue = cache if queue_url == config.redis_url else redis_client(queue_url, config)

    async def close() -> None:
        await cache.aclose(close_connection_pool=True)
        if queue is not cache:
            await queue.aclose(close_connection_pool=True)

    return Backend(
        store=RedisStore(cache, prefix=config.prefix, claim_ttl=config.claim_lease),
        queue=ArqQueue(queue, queue_name=config.queue, expires=config.claim_lease),
        close=close,
    )
