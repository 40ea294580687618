"""A backend: a `Store` and a `JobQueue` that belong together, and the connections under them.

Three shapes, chosen by `Config`:

| config                  | store        | queue                          |
| ----------------------- | ------------ | ------------------------------ |
| `redis://...` (default) | `RedisStore` | `ArqQueue` (arq worker process) |
| `inline_worker=True`    | `RedisStore` | `InProcessQueue`               |
| `memory://`             | `MemoryStore`| `InProcessQueue`               |
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from starlette.types import ASGIApp

from .config import Config
from .jobs import run_job
from .memory import InProcessQueue, MemoryStore
from .queue import ArqQueue, Job, JobQueue
from .store import RedisStore, Store

StateProvider = Callable[[], Mapping[str, Any] | None]


@dataclass(frozen=True, slots=True)
class Backend:
    """What the middleware needs: where entries live and where jobs go."""

    store: Store
    queue: JobQueue
    close: Callable[[], Awaitable[None]]
    """Stops in-process jobs and releases the connections under both."""


def open_backend(config: Config, *, app: ASGIApp, state: StateProvider) -> Backend:
    """The backend `config` asks for. In-process jobs replay through `app`."""
    if not config.in_process:
        return redis_backend(config)
    closers: list[Callable[[], Awaitable[None]]] = []
    store: Store
    if config.embedded:
        store = MemoryStore(claim_ttl=config.claim_lease)
    else:
        client = redis_client(config.redis_url, config)
        store = RedisStore(client, prefix=config.prefix, claim_ttl=config.claim_lease)
        closers.append(lambda: client.aclose(close_connection_pool=True))

    async def run(job: Job) -> None:
        await run_job(app, store, config, job.snapshot, job.token, state=state())

    queue = InProcessQueue(run, max_jobs=config.max_jobs)
    closers.insert(0, queue.close)  # stop the jobs before their connections go

    async def close() -> None:
        for closer in closers:
            await closer()

    return Backend(store=store, queue=queue, close=close)


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
