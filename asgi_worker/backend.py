"""A backend: a `Store`, a `JobQueue` and the wake-ups for waiting requests, together.

Three shapes, chosen by `Config`:

| config                  | store         | queue                           | wake-ups     |
| ----------------------- | ------------- | ------------------------------- | ------------ |
| `redis://...` (default) | `RedisStore`  | `ArqQueue` (arq worker process) | Redis pub/sub|
| `inline_worker=True`    | `RedisStore`  | `InProcessQueue`                | Redis pub/sub|
| `memory://`             | `MemoryStore` | `InProcessQueue`                | in-process   |
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
from .keys import RedisKeys
from .memory import InProcessQueue, MemoryStore
from .queue import ArqQueue, Job, JobQueue
from .store import RedisStore, Store
from .waiting import RedisListener, Waiters

StateProvider = Callable[[], Mapping[str, Any] | None]
Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backend:
    """What the middleware needs: where entries live, where jobs go, who waits."""

    store: Store
    queue: JobQueue
    waiters: Waiters
    listen: Callable[[float], Awaitable[None]]
    """Make sure stored-digest notifications reach `waiters` (wait at most N seconds)."""
    close: Closer
    """Stops in-process jobs and listeners, and releases the connections."""


def open_backend(config: Config, *, app: ASGIApp, state: StateProvider) -> Backend:
    """The backend `config` asks for. In-process jobs replay through `app`."""
    waiters = Waiters(config.max_waiters)
    closers: list[Closer] = []
    store: Store
    queue: JobQueue
    if config.embedded:
        store = MemoryStore(claim_ttl=config.claim_lease, on_stored=waiters.wake)
        listen = _nothing_to_start
    else:
        cache = redis_client(config.redis_url, config)
        store = RedisStore(cache, prefix=config.prefix, claim_ttl=config.claim_lease)
        listener = RedisListener(cache, RedisKeys(config.prefix).stored_channel(), waiters)
        listen = listener.ready
        closers += [listener.close, lambda: cache.aclose(close_connection_pool=True)]
    if config.in_process:

        async def run(job: Job) -> None:
            await run_job(app, store, config, job.snapshot, job.token, state=state())

        queue = InProcessQueue(run, max_jobs=config.max_jobs)
        closers.insert(0, queue.close)  # stop the jobs before their connections go
    else:
        queue_url = config.queue_redis_url or config.redis_url
        queue_client = cache if queue_url == config.redis_url else redis_client(queue_url, config)
        queue = ArqQueue(queue_client, queue_name=config.queue, expires=config.claim_lease)
        if queue_client is not cache:
            closers.append(lambda: queue_client.aclose(close_connection_pool=True))

    async def close() -> None:
        for closer in closers:
            await closer()

    return Backend(store=store, queue=queue, waiters=waiters, listen=listen, close=close)


def redis_client(url: str, config: Config) -> ArqRedis:
    """A client for `url` that gives up after `config.redis_timeout` seconds."""
    pool = ConnectionPool.from_url(
        url,
        socket_timeout=config.redis_timeout,
        socket_connect_timeout=config.redis_timeout,
    )
    return ArqRedis(pool_or_conn=pool, default_queue_name=config.queue)


async def _nothing_to_start(within: float) -> None:
    """The memory store wakes waiters itself."""
