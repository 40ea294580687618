"""A backend: a `Store`, a `JobQueue` and the wake-ups for waiting requests, together.

Three shapes, chosen by `Config`:

| config                  | store         | queue                           | wake-ups     |
| ----------------------- | ------------- | ------------------------------- | ------------ |
| `redis://...` (default) | `RedisStore`  | `ArqQueue` (arq worker process) | Redis pub/sub|
| `inline_worker=True`    | `RedisStore`  | `InProcessQueue`                | Redis pub/sub|
| `memory://`             | `MemoryStore` | `InProcessQueue`                | in-process   |
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool, Redis
from starlette.types import ASGIApp

from asgi_worker.backends.base import Job, JobQueue, Store
from asgi_worker.backends.memory import InProcessQueue, MemoryStore
from asgi_worker.backends.redis.clients import (
    NodeSubscriber,
    PubSubSource,
    close_client,
    redis_client,
    shared_source,
    store_client,
)
from asgi_worker.backends.redis.events import INVALIDATED, EventListener
from asgi_worker.backends.redis.queue import ArqQueue
from asgi_worker.backends.redis.retries import Throttle
from asgi_worker.backends.redis.sentinel import FailoverWatch
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.codec import StoredResponse
from asgi_worker.core.config import Config
from asgi_worker.core.keys import RedisKeys
from asgi_worker.observability.observer import Observer
from asgi_worker.web.near_cache import NearCache, response_cost
from asgi_worker.web.waiting import Waiters
from asgi_worker.worker.job import release, run_job

logger = logging.getLogger("asgi_worker")

StateProvider = Callable[[], Mapping[str, Any] | None]

RELEASES_PENDING = 1024
"""The most claims a web process releases in the background at once (`Releases`); past
that, a claim waits out its lease."""


@dataclass(frozen=True, slots=True)
class ReplayEntrance:
    """Where an in-process replay enters the app (see `WorkerMiddleware._entrance_for`)."""

    app: ASGIApp
    mounted: bool = False
    """`app` is a sub-app below a `Mount`: enter it with the mount's root path."""


EntranceProvider = Callable[[], ReplayEntrance]

Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backend:
    """What the middleware needs: where entries live, where jobs go, who waits."""

    store: Store
    queue: JobQueue
    waiters: Waiters
    events: EventListener | None
    """Redis backends: the process's one subscription to stored/invalidated events."""
    near: NearCache[StoredResponse] | None
    """The near cache for hot keys (`Config.near_cache_ttl`), if on."""
    close: Closer
    """Stops in-process jobs and listeners, and releases the connections."""
    releases: Releases
    """The claims this process gives up in the background (see `Releases`)."""
    failover: FailoverWatch | None = None
    """On `redis+sentinel://`: drops the cache's and the queue's connections when the
    master changes. Started by the first lookup (it needs the server's event loop)."""

    async def listen(self, within: float) -> None:
        """Make sure stored-digest events reach `waiters` (wait at most `within` s)."""
        if self.events is not None:
            await self.events.ready(within)

    def near_cache(self) -> NearCache[StoredResponse] | None:
        """The near cache, only while the events that evict from it are being heard.

        Every lookup asks for it first, so this is also where the failover watch starts.
        """
        if self.failover is not None and not self.failover.running:
            self.failover.start()
        if self.near is None or self.events is None:
            return None
        if not self.events.subscribed:
            self.events.start()
            return None
        return self.near


class Releases:
    """Claims this web process gives up in the background, each until Redis takes it.

    A lookup or an enqueue cut off by its request's deadline may leave a claim behind: a
    lookup whose reply was lost may have claimed the URL all the same, and a claim whose
    enqueue failed has no job to end it. The request answers at once; the release goes
    on here, each try bounded by `redis_timeout`, tried again until the claim's lease
    would have ended anyway. So once Redis answers again, the next request claims the URL
    and enqueues its job, instead of waiting out the lease (`Config.claim_lease`).

    The lease stays the fallback: for a release Redis does not take before it ends, for
    one past `RELEASES_PENDING` pending at once, and for one pending at shutdown.
    Releasing is safe to repeat: a claim is released only by the token that holds it.
    """

    def __init__(self, store: Store, *, each: float, within: float) -> None:
        """Each try takes at most `each` seconds, and none begins after `within`."""
        self._store = store
        self._each = each
        self._within = within
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._throttle = Throttle()

    def __len__(self) -> int:
        """Releases on their way now."""
        return len(self._pending)

    def send(self, digest: str, token: str) -> asyncio.Task[None] | None:
        """Release the claim `token` holds on `digest`; the task doing it, None if too many.

        The task ends once the claim is released, or has been given up on (it never
        raises). A token already on its way is not sent twice.
        """
        task = self._pending.get(token)
        if task is not None:
            return task
        if len(self._pending) >= RELEASES_PENDING:
            self._throttle.log(
                logging.WARNING,
                "asgi-worker: %d claims are being released already: this one waits out its lease",
                len(self._pending),
            )
            return None
        task = asyncio.ensure_future(self._release(digest, token))
        self._pending[token] = task
        task.add_done_callback(lambda _: self._pending.pop(token, None))
        return task

    async def _release(self, digest: str, token: str) -> None:
        if not await release(self._store, digest, token, self._within, each=self._each):
            self._throttle.log(
                logging.WARNING,
                "asgi-worker: could not release a claim within its lease: its URL answers "
                "202 until the lease ends",
            )

    async def close(self) -> None:
        """Stop the releases still on their way: their claims wait out their leases."""
        pending = list(self._pending.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def open_backend(
    config: Config,
    *,
    entrance: EntranceProvider,
    state: StateProvider,
    observer: Observer | None = None,
) -> Backend:
    """The backend `config` asks for. In-process jobs replay through `entrance()`.

    `observer` sees the in-process jobs (the arq worker has its own).
    """
    waiters = Waiters(config.max_waiters)
    closers: list[Closer] = []
    store: Store
    queue: JobQueue
    events: EventListener | None = None
    near: NearCache[StoredResponse] | None = None
    pools: list[ConnectionPool] = []  # what a Sentinel failover drops
    if config.embedded:
        store = MemoryStore(claim_ttl=config.claim_lease, on_stored=waiters.wake)
    else:
        cache = store_client(config.redis_url, config, read_timeout=False)
        source: PubSubSource
        if isinstance(cache, Redis):
            pools.append(cache.connection_pool)
            source = shared_source(cache)
        else:  # a Cluster: events are heard on one node at a time
            source = NodeSubscriber(cache, config.redis_url, config)
        store = RedisStore(cache, prefix=config.prefix, claim_ttl=config.claim_lease)
        if config.near_cache_ttl > 0:
            near = NearCache(
                ttl=config.near_cache_ttl, max_bytes=config.near_cache_bytes, cost=response_cost
            )
        events = EventListener(
            source,
            RedisKeys(config.prefix).events(),
            on_event=partial(_on_event, waiters, near),
            on_resync=partial(_on_resync, waiters, near),
        )
        closers += [events.close, lambda: close_client(cache)]
    if config.in_process:
        throttle = Throttle()  # the Redis errors the jobs give up on, logged once per 10 s

        async def run(job: Job) -> None:
            where = entrance()
            await run_job(
                where.app,
                store,
                config,
                job.snapshot,
                job.token,
                job.claimed_at,
                state=state(),
                mounted=where.mounted,
                observer=observer,
                trace=job.trace,
                throttle=throttle,
                progress=lambda progress, ended: queue.report(job.job_id, progress, ended=ended),
            )

        queue = InProcessQueue(run, max_jobs=config.max_jobs, max_queued=config.max_queued)
        closers.insert(0, queue.close)  # stop the jobs before their connections go
    else:
        queue_url = config.queue_redis_url or config.redis_url
        queue_client = (
            cache
            if queue_url == config.redis_url and isinstance(cache, ArqRedis)
            else redis_client(queue_url, config)
        )
        pools.append(queue_client.connection_pool)
        queue = ArqQueue(
            queue_client,
            queue_name=config.queue,
            expires=config.claim_lease,
            prefix=config.prefix,
            max_queued=config.max_queued,
            fair_slots=config.max_jobs if config.fair_queueing else 0,
            # Due later than this, a job could not finish within its claim lease (but a
            # path may always have a second of backlog: a lease set tight is no reason
            # to refuse every job after the first).
            horizon=max(1.0, config.claim_lease - config.job_timeout - config.redis_timeout),
        )
        if queue_client is not cache:
            closers.append(lambda: queue_client.aclose(close_connection_pool=True))
    failover = FailoverWatch.for_pools(*pools, connect_timeout=config.redis_timeout)
    if failover is not None:
        # After the in-process jobs, before the connections it would drop are closed.
        closers.insert(1 if config.in_process else 0, failover.stop)
    releases = Releases(store, each=config.redis_timeout, within=config.claim_lease)
    closers.insert(0, releases.close)  # before the connections they are sent on close

    async def close() -> None:
        for closer in closers:
            await closer()

    return Backend(store, queue, waiters, events, near, close, releases, failover)


def _on_event(waiters: Waiters, near: NearCache[StoredResponse] | None, event: str) -> None:
    if event == INVALIDATED:
        if near is not None:
            near.clear()
        return
    waiters.wake(event)
    if near is not None:
        near.evict(event)


def _on_resync(waiters: Waiters, near: NearCache[StoredResponse] | None) -> None:
    waiters.wake_all()
    if near is not None:
        near.clear()
