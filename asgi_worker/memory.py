"""The embedded backend: an in-process `Store` and a `JobQueue` that runs jobs as tasks.

`MemoryStore` keeps the Redis store's semantics (atomic lookup-or-claim, claim leases that
expire, entry TTLs) for one process. `InProcessQueue` runs each job as an asyncio task in
the web process, at most `max_jobs` at once; it serves both `memory://` and the Redis
store with `Config(inline_worker=True)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .queue import Job
from .store import Lookup, Outcome

logger = logging.getLogger("asgi_worker")

# (value, monotonic deadline)
_Expiring = tuple[bytes, float]


class MemoryStore:
    """A `Store` in a dict. Each method runs without awaiting, so each is atomic."""

    def __init__(self, *, claim_ttl: float) -> None:
        self._claim_ttl = claim_ttl
        self._entries: dict[str, _Expiring] = {}
        self._claims: dict[str, tuple[str, float]] = {}
        self._writes_since_sweep = 0

    async def lookup(self, digest: str, token: str) -> Lookup:
        """See `Store.lookup`."""
        now = time.monotonic()
        entry = self._entries.get(digest)
        if entry is not None and entry[1] > now:
            return Lookup(Outcome.HIT, entry[0])
        claim = self._claims.get(digest)
        if claim is not None and claim[1] > now:
            return Lookup(Outcome.PENDING)
        self._claims[digest] = (token, now + self._claim_ttl)
        self._wrote(now)
        return Lookup(Outcome.CLAIMED)

    async def commit(self, digest: str, token: str, entry: bytes, ttl: float) -> None:
        """See `Store.commit`."""
        now = time.monotonic()
        self._entries[digest] = (entry, now + ttl)
        await self.release(digest, token)
        self._wrote(now)

    async def release(self, digest: str, token: str) -> None:
        """See `Store.release`."""
        claim = self._claims.get(digest)
        if claim is not None and claim[0] == token:
            del self._claims[digest]

    async def discard(self, digest: str) -> None:
        """See `Store.discard`."""
        self._entries.pop(digest, None)

    def __len__(self) -> int:
        """Entries held, fresh or not yet swept."""
        return len(self._entries)

    def _wrote(self, now: float) -> None:
        # Expired items are dropped lazily: a full sweep once writes reach half the size,
        # so memory stays proportional to live items at O(1) amortised cost per write.
        self._writes_since_sweep += 1
        if self._writes_since_sweep * 2 < len(self._entries) + len(self._claims):
            return
        self._writes_since_sweep = 0
        self._entries = {key: item for key, item in self._entries.items() if item[1] > now}
        self._claims = {key: item for key, item in self._claims.items() if item[1] > now}


class InProcessQueue:
    """A `JobQueue` that runs jobs as asyncio tasks in this process, `max_jobs` at a time."""

    def __init__(self, run: Callable[[Job], Awaitable[object]], *, max_jobs: int) -> None:
        self._run = run
        self._slots = asyncio.Semaphore(max_jobs)
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self, job: Job) -> None:
        """See `JobQueue.enqueue`: starts the job and returns at once."""
        task = asyncio.create_task(self._guarded(job), name=f"asgi-worker {job.job_id}")
        self._tasks.add(task)  # a strong reference, or the loop may drop the task
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        """Jobs enqueued and not finished."""
        return len(self._tasks)

    async def drain(self) -> int:
        """Wait until no job is left, including jobs enqueued meanwhile; returns how many ran."""
        seen: set[asyncio.Task[None]] = set()
        while batch := self._tasks - seen:  # done tasks may linger until their callback
            seen |= batch
            await asyncio.gather(*batch, return_exceptions=True)
        return len(seen)

    async def close(self) -> None:
        """Cancel the jobs still running (their claims lapse, so the requests re-claim)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _guarded(self, job: Job) -> None:
        async with self._slots:
            try:
                await self._run(job)
            except Exception:
                # run_job stores an error response for app failures; this is the store
                # failing under it. The claim lapses and a later request re-claims.
                logger.exception("asgi-worker: in-process job %s failed", job.job_id)
