"""`DashboardObserver`: the counts behind the ops dashboard (`Config.dashboard_counts`).

Hits, misses and lookup latency per minute (`counts.MinuteCounts`) and the jobs that
ended (`recent_jobs`). Counting is a few additions in the process, never I/O on the
request's path: on Redis the counts gathered are written to the queue's Redis in one
pipeline, one second after the first of them, by a task of their own (so at most about
one write a second per process, whatever the traffic). A write that fails is dropped
(logged at DEBUG): these are an operator's view, not a ledger. With `memory://` nothing
is written; the dashboard reads this observer in the process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from asgi_worker.backends.redis.clients import close_client
from asgi_worker.core.keys import RedisKeys
from asgi_worker.observability.counts import MinuteCounts, write_minutes
from asgi_worker.observability.observer import (
    AtExit,
    JobRecord,
    NoObserver,
    Observer,
    Observers,
    RequestRecord,
)
from asgi_worker.observability.recent_jobs import KEPT, RecentJob, RecentJobs, push_jobs

logger = logging.getLogger("asgi_worker")

HITS = frozenset({"hit", "stale"})
"""Request outcomes counted as hits (see `observer.REQUEST_OUTCOMES`)."""
MISSES = frozenset({"miss-enqueued", "miss-queued", "waited"})
"""Request outcomes counted as misses: answered without a stored response at first."""

WRITE_AFTER = 1.0
"""Seconds from the first count not yet written to the write that takes it."""
WRITE_TIMEOUT = 5.0
"""Seconds a write may take before it is given up (and its counts dropped)."""
CLOSE_TIMEOUT = 1.0
"""Seconds the last write, at shutdown, may hold the shutdown up."""


class DashboardObserver(NoObserver):
    """Counts requests and keeps the jobs that end, for the dashboard.

    `connect` makes a client on the queue's Redis, where the counts are written; None
    (`memory://`) keeps them in the process only (`counts`, `recent`).
    """

    def __init__(self, keys: RedisKeys, connect: Callable[[], Any] | None) -> None:
        self.keys = keys
        self.counts = MinuteCounts()
        """This process's counts: everything with `memory://`, else what is not written yet."""
        self.recent = RecentJobs()
        """With `memory://`, the jobs that ended here (on Redis they are written instead)."""
        self._connect = connect
        self._unwritten: list[RecentJob] = []
        # When the write scheduled should have begun, on the counts' clock: a count past it
        # schedules one. Not a flag: a write whose loop closed before it began (a test's
        # loop) is not waited for forever. Never, without Redis.
        self._write_by = math.inf if connect is None else 0.0
        self._client: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._own_client = False  # made by `connect` (closed by `close`), not the worker's
        self._writing: set[asyncio.Task[None]] = set()  # strong references to the writes

    def request(self, record: RequestRecord) -> AtExit:
        """See `Observer.request`: the outcome is counted at exit."""
        return AtExit(self._count, record)

    def _count(self, record: RequestRecord) -> None:
        outcome = record.outcome
        if outcome in HITS:
            self.counts.bucket().hits += 1
        elif outcome in MISSES:
            self.counts.bucket().misses += 1
        else:
            return
        if self.counts.now > self._write_by:
            self.counted()

    def lookup(self, seconds: float) -> None:
        """See `Observer.lookup`."""
        bucket = self.counts.bucket()
        bucket.lookups += 1
        bucket.lookup_seconds += seconds

    def job_ended(self, record: JobRecord) -> None:
        """See `Observer.job_ended`."""
        job = RecentJob(record.path, round(record.seconds, 6), record.outcome, time.time())
        if self._connect is None:
            self.recent.add(job)
            return
        self._unwritten.append(job)
        if len(self._unwritten) > KEPT:  # Redis unreachable a while: the list keeps no more
            del self._unwritten[0]
        if job.at > self._write_by:
            self.counted()

    def watch_queue(self, redis: Any, queue_name: str, timeout: float) -> None:
        """See `Observer.watch_queue`: the worker's queue client, written with."""
        self._client = (asyncio.get_running_loop(), redis)
        self._own_client = False

    async def close(self) -> None:
        """See `Observer.close`: write what is counted, close the client it made."""
        if self._connect is None:
            return
        if self._unwritten or self.counts.take_would_write():
            await self._write(asyncio.get_running_loop(), within=CLOSE_TIMEOUT)
        client, self._client = self._client, None
        if client is not None and self._own_client:
            await close_client(client[1])

    def counted(self) -> None:
        """Something is counted and not written: write it `WRITE_AFTER` seconds from now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to write from: kept for the next count's write
            return
        self._write_by = time.time() + WRITE_AFTER + WRITE_TIMEOUT
        loop.call_later(WRITE_AFTER, self._start_write, loop)

    def _start_write(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._write(loop))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, loop: asyncio.AbstractEventLoop, within: float = WRITE_TIMEOUT) -> None:
        self._write_by = 0.0  # what is counted from now on is the next write's
        buckets, jobs = self.counts.take(), self._unwritten
        self._unwritten = []
        try:
            redis = self._client_for(loop)
            async with asyncio.timeout(within):
                async with redis.pipeline(transaction=False) as pipeline:
                    write_minutes(pipeline, self.keys, buckets)
                    push_jobs(pipeline, self.keys, jobs[::-1])
                    await pipeline.execute()
        except (RedisError, OSError, TimeoutError) as error:
            logger.debug("asgi-worker: dashboard counts not written: %r", error)

    def _client_for(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The client to write with, made on this loop (a client serves one loop only)."""
        if self._client is None or self._client[0] is not loop:
            assert self._connect is not None
            self._client = (loop, self._connect())
            self._own_client = True
        return self._client[1]


def dashboard_observer(observer: Observer | None) -> DashboardObserver | None:
    """The `DashboardObserver` in `observer` (itself, or one of several), if any."""
    if isinstance(observer, DashboardObserver):
        return observer
    if isinstance(observer, Observers):  # several, perhaps nested
        found = (dashboard_observer(inner) for inner in observer.observers)
        return next((inner for inner in found if inner is not None), None)
    return None
