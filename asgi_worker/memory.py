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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .queue import Job
from .store import Committed, Lookup, Write
from .targets import ByGlob, ByQuery, ByTag, Target, query_matches

logger = logging.getLogger("asgi_worker")


@dataclass(slots=True)
class _Entry:
    value: bytes
    fresh_until: float
    keep_until: float


@dataclass(frozen=True, slots=True)
class _Claim:
    token: str
    until: float
    path: str  # kept in the path index while the claim lives (see `lookup`)


class MemoryStore:
    """A `Store` in dicts, on the monotonic clock. No method awaits, so each is atomic."""

    def __init__(self, *, claim_ttl: float, on_stored: Callable[[str], None] | None = None) -> None:
        self._claim_ttl = claim_ttl
        # Called with each digest a commit stores: wakes `Prefer: wait` requests.
        self._on_stored = on_stored
        # An invalidation stamp matters only to jobs that began before it (see store.py).
        self._stamp_ttl = claim_ttl + 60.0
        self._entries: dict[str, _Entry] = {}
        self._claims: dict[str, _Claim] = {}
        self._paths: dict[str, dict[str, bytes]] = {}  # path -> digest -> query
        self._tags: dict[str, set[str]] = {}  # tag -> digests
        self._path_stamps: dict[str, float] = {}
        self._tag_stamps: dict[str, float] = {}
        self._durations: dict[str, float] = {}  # path -> moving average, seconds
        self._writes_since_sweep = 0

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """See `Store.lookup`."""
        now = time.monotonic()
        entry = self._live(digest, now)
        if entry is not None and entry.fresh_until > now:
            return Lookup(entry.value)
        value = entry.value if entry else None
        if self._holder(digest, now) is not None:
            return Lookup(value, stale=entry is not None)
        self._claim(digest, token, path, now)
        self._wrote(now)
        return Lookup(value, stale=entry is not None, claimed=True, claimed_at=now)

    def lease_left(self, claimed_at: float) -> float:
        """See `Store.lease_left`."""
        return claimed_at + self._claim_ttl - time.monotonic()

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """See `Store.begin`."""
        now = time.monotonic()
        if self._holder(digest, now) not in (None, token):
            return None
        self._claim(digest, token, path, now)
        return now

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """See `Store.commit`."""
        now = time.monotonic()
        holder = self._holder(digest, now)
        if holder not in (None, token):
            return Committed.REFUSED
        stamps = [self._path_stamps.get(write.path)]
        stamps += [self._tag_stamps.get(tag) for tag in write.tags]
        if any(stamp is not None and stamp >= started for stamp in stamps):
            self._claims.pop(digest, None)
            return Committed.REFUSED
        if write.failed and self._live(digest, now) is not None:
            self._claims[digest] = _Claim(token, now + write.retry_after, write.path)
            return Committed.KEPT_STALE
        self._entries[digest] = _Entry(write.entry, now + write.fresh, now + write.keep)
        self._claims.pop(digest, None)
        self._paths.setdefault(write.path, {})[digest] = write.query
        for tag in write.tags:
            self._tags.setdefault(tag, set()).add(digest)
        if write.duration is not None:
            before = self._durations.get(write.path)
            self._durations[write.path] = (
                write.duration if before is None else before * 0.7 + write.duration * 0.3
            )
        self._wrote(now)
        if self._on_stored is not None:
            self._on_stored(digest)
        return Committed.STORED

    async def release(self, digest: str, token: str) -> None:
        """See `Store.release`."""
        if self._holder(digest, time.monotonic()) == token:
            del self._claims[digest]

    async def discard(self, digest: str) -> None:
        """See `Store.discard`."""
        self._entries.pop(digest, None)

    async def typical_duration(self, path: str) -> float | None:
        """See `Store.typical_duration`."""
        return self._durations.get(path)

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """See `Store.invalidate`."""
        now = time.monotonic()
        if isinstance(target, ByTag):
            self._tag_stamps[target.tag] = now
            digests = self._tags.get(target.tag, set())
            count = self._drop(digests, soft, now)
            if not soft:
                self._tags.pop(target.tag, None)
            return count
        if isinstance(target, ByGlob):
            paths = [path for path in self._paths if target.matches(path)]
        else:
            paths = [target.path]
        count = 0
        for path in paths:
            self._path_stamps[path] = now
            index = self._paths.get(path, {})
            if isinstance(target, ByQuery):
                chosen = [d for d, query in index.items() if query_matches(query, target.params)]
            else:
                chosen = list(index)
            count += self._drop(chosen, soft, now)
            if not soft:
                for digest in chosen:
                    index.pop(digest, None)
        return count

    def __len__(self) -> int:
        """Entries held, live or not yet swept."""
        return len(self._entries)

    def _drop(self, digests: Iterable[str], soft: bool, now: float) -> int:
        count = 0
        for digest in digests:
            entry = self._live(digest, now)
            if entry is None:
                continue
            count += 1
            if soft:
                entry.fresh_until = min(entry.fresh_until, now)
            else:
                del self._entries[digest]
        return count

    def _live(self, digest: str, now: float) -> _Entry | None:
        entry = self._entries.get(digest)
        return entry if entry is not None and entry.keep_until > now else None

    def _holder(self, digest: str, now: float) -> str | None:
        claim = self._claims.get(digest)
        return claim.token if claim is not None and claim.until > now else None

    def _claim(self, digest: str, token: str, path: str, now: float) -> None:
        self._claims[digest] = _Claim(token, now + self._claim_ttl, path)
        self._paths.setdefault(path, {})  # so a glob invalidation during the job stamps it

    def _wrote(self, now: float) -> None:
        # Expired items are dropped lazily: a full sweep once writes reach half the size,
        # so memory stays proportional to live items at O(1) amortised cost per write.
        self._writes_since_sweep += 1
        if self._writes_since_sweep * 2 < len(self._entries) + len(self._claims):
            return
        self._writes_since_sweep = 0
        self._entries = {key: e for key, e in self._entries.items() if e.keep_until > now}
        self._claims = {key: c for key, c in self._claims.items() if c.until > now}
        for index in self._paths.values():
            for digest in [d for d in index if d not in self._entries]:
                del index[digest]
        running = {claim.path for claim in self._claims.values()}
        self._paths = {p: index for p, index in self._paths.items() if index or p in running}
        for digests in self._tags.values():
            digests &= self._entries.keys()
        self._tags = {tag: digests for tag, digests in self._tags.items() if digests}
        horizon = now - self._stamp_ttl
        self._path_stamps = {p: at for p, at in self._path_stamps.items() if at > horizon}
        self._tag_stamps = {t: at for t, at in self._tag_stamps.items() if at > horizon}


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
