"""What the ops dashboard shows, read in one go: `RedisReader` and `ProcessReader`.

Both give `read()` a JSON-ready dict of the same shape (`state`): the queue's depth and
oldest job, the running jobs with their progress, the recent jobs, the last hour's hit
ratio and lookup latency, and the paths holding the most entries. `RedisReader` reads the
Redis of a `Config` (its own clients, so a dashboard served apart from the app sees every
web process and worker); `ProcessReader` reads a `memory://` app's own queue, store and
counts, in its process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from asgi_worker.backends.base import JobQueue, RunningJob
from asgi_worker.backends.memory import InProcessQueue, MemoryStore
from asgi_worker.backends.redis.clients import close_client, redis_client, store_client
from asgi_worker.backends.redis.queue import ArqQueue
from asgi_worker.core.config import Config
from asgi_worker.core.keys import RedisKeys
from asgi_worker.observability.counts import Bucket, read_minutes
from asgi_worker.observability.dashboard_counts import DashboardObserver
from asgi_worker.observability.recent_jobs import RecentJob, read_jobs
from asgi_worker.observability.stats import QueueDepth, read_queue

RUNNING_SHOWN = 50
"""Running jobs listed at most."""
RECENT_SHOWN = 50
"""Recent jobs listed at most."""
BIGGEST_SHOWN = 10
"""Paths listed by their entries."""
PATHS_COUNTED = 2000
"""Paths whose entries are counted for the biggest (the first, in byte order): one
`ZCOUNT` each, so a huge path list is sampled, not walked."""
BIGGEST_EVERY = 5.0
"""Seconds the biggest paths are reused before they are counted again."""
STATE_EVERY = 1.0
"""Seconds a Redis read of the whole state is reused: however many pages poll one
dashboard process, its Redis reads (a `SCAN` of the queue's keyspace among them) stay at
one set a second."""

Value = TypeVar("Value")


def state(
    depth: QueueDepth,
    running: list[RunningJob],
    recent: list[RecentJob],
    minutes: list[Bucket],
    biggest: list[tuple[str, int]],
    *,
    counting: bool,
) -> dict[str, Any]:
    """The dashboard's JSON: plain values only."""
    total = Bucket(0)
    for bucket in minutes:
        total.add(bucket)
    answered = total.hits + total.misses
    hour = total.as_dict()
    hour["hit_ratio"] = total.hits / answered if answered else None
    return {
        "at": time.time(),
        "counting": counting,
        "queue": {
            "queued": depth.queued,
            "oldest_seconds": depth.oldest_queued,
            "worker_health": depth.worker_health,
        },
        "running": [
            {
                "job_id": job.job_id,
                "path": job.path,
                "fraction": None if job.progress is None else job.progress.fraction,
                "message": None if job.progress is None else job.progress.message,
            }
            for job in running
        ],
        "recent": [
            {"path": job.path, "seconds": job.seconds, "outcome": job.outcome, "at": job.at}
            for job in recent
        ],
        "hour": hour,
        "minutes": [bucket.as_dict() for bucket in minutes],
        "biggest": [{"path": path, "entries": entries} for path, entries in biggest],
    }


class _Reused(Generic[Value]):
    """A value read again only once it is `every` seconds old; one read at a time.

    Callers that come while a read is on its way wait for that one.
    """

    def __init__(self, read: Callable[[], Awaitable[Value]], every: float):
        self._read = read
        self._every = every
        self._value: Value | None = None
        self._at: float | None = None
        self._reading: asyncio.Task[Value] | None = None

    async def get(self) -> Value:
        now = time.monotonic()
        if self._value is not None and self._at is not None and now - self._at < self._every:
            return self._value
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._keep)
        # Shielded: a caller that goes away does not cancel the read the others wait for.
        return await asyncio.shield(self._reading)

    def _keep(self, reading: asyncio.Task[Value]) -> None:
        if not reading.cancelled() and reading.exception() is None:
            self._value, self._at = reading.result(), time.monotonic()


def largest(counts: dict[str, int]) -> list[tuple[str, int]]:
    """The `BIGGEST_SHOWN` paths with the most entries, most first."""
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:BIGGEST_SHOWN]


class RedisReader:
    """Reads a `Config`'s Redis (the store's and the queue's), with clients of its own.

    The clients are made on the event loop of the first read (a client serves one loop)
    and closed by `close`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._keys = RedisKeys(config.prefix)
        self._clients: tuple[asyncio.AbstractEventLoop, Any, Any, ArqQueue] | None = None
        self._biggest = _Reused(self._count_biggest, BIGGEST_EVERY)
        self._state = _Reused(self._read_now, STATE_EVERY)

    def _open(self) -> tuple[Any, Any, ArqQueue]:
        loop = asyncio.get_running_loop()
        if self._clients is None or self._clients[0] is not loop:
            config = self.config
            store = store_client(config.redis_url, config)
            # A client of its own even on one Redis: arq's kind (`ArqRedis`), and a
            # Cluster's store client is no queue's.
            queue = redis_client(config.queue_redis_url or config.redis_url, config)
            jobs = ArqQueue(
                queue, queue_name=config.queue, expires=config.claim_lease, prefix=config.prefix
            )
            self._clients = (loop, store, queue, jobs)
        return self._clients[1:]

    async def read(self) -> dict[str, Any]:
        """The dashboard's state (see `state`), read at most once per `STATE_EVERY` s."""
        return await self._state.get()

    async def _read_now(self) -> dict[str, Any]:
        """A handful of round trips, run together."""
        _, queue, jobs = self._open()
        depth, running, recent, minutes, biggest = await asyncio.gather(
            read_queue(queue, self.config.queue),
            jobs.running(RUNNING_SHOWN),
            read_jobs(queue, self._keys, RECENT_SHOWN),
            read_minutes(queue, self._keys),
            self._biggest.get(),
        )
        return state(
            depth, running, recent, minutes, biggest, counting=self.config.dashboard_counts
        )

    async def _count_biggest(self) -> list[tuple[str, int]]:
        store, _, _ = self._open()
        keys = self._keys
        paths = [
            raw.decode("utf-8", "surrogatepass")
            for raw in await store.zrange(keys.paths(), 0, PATHS_COUNTED - 1)
        ]
        if not paths:
            return []
        now_ms = int(time.time() * 1000)  # the indexes score entries by expiry, in ms
        async with store.pipeline(transaction=False) as pipeline:
            for path in paths:
                pipeline.zcount(keys.path_index(path), now_ms, "+inf")
            counts = await pipeline.execute()
        return largest({path: int(n) for path, n in zip(paths, counts, strict=True) if n})

    async def close(self) -> None:
        """Close the clients, if any were made."""
        if self._clients is not None:
            _, store, queue, _ = self._clients
            self._clients = None
            await close_client(store)
            await close_client(queue)


class ProcessReader:
    """Reads a `memory://` app in its own process: its queue, store and counts."""

    def __init__(
        self, queue: JobQueue, store: MemoryStore, counts: DashboardObserver | None
    ) -> None:
        self._queue = queue
        self._store = store
        self._counts = counts

    async def read(self) -> dict[str, Any]:
        """The dashboard's state (see `state`); nothing to wait for but the queue."""
        pending = self._queue.pending if isinstance(self._queue, InProcessQueue) else 0
        running = await self._queue.running(RUNNING_SHOWN)
        counts = self._counts
        return state(
            QueueDepth(queued=pending, oldest_queued=None, worker_health="in process"),
            running,
            [] if counts is None else counts.recent.latest(RECENT_SHOWN),
            [] if counts is None else counts.counts.last_hour(),
            largest(self._store.entries_by_path()),
            counting=counts is not None,
        )

    async def close(self) -> None:
        """Nothing to close: the app owns what is read."""
