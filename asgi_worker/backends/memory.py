"""The embedded backend: an in-process `Store` and a `JobQueue` that runs jobs as tasks.

`MemoryStore` keeps the Redis store's semantics (atomic lookup-or-claim, claim leases that
expire, entry TTLs, indexes that stay near the size of what they name that is live) for
one process. `InProcessQueue` runs each job as an asyncio task in the web process, at
most `max_jobs` at once; it serves both `memory://` and the Redis store with
`Config(inline_worker=True)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from asgi_worker.backends.base import (
    BACKING_OFF,
    REPLACED_BODY_GRACE,
    Committed,
    Job,
    JobState,
    Lookup,
    QueueFull,
    RunningJob,
    Write,
)
from asgi_worker.core.invalidation_targets import ByGlob, ByQuery, ByTag, Target, query_matches
from asgi_worker.core.progress import KEEP_AFTER_END, Progress

logger = logging.getLogger("asgi_worker")

# How often `InProcessQueue.drain` looks at jobs running on another event loop.
_WATCH_EVERY = 0.005


@dataclass(slots=True)
class _Entry:
    value: bytes
    fresh_until: float
    keep_until: float
    version: str | None = None
    """Its body's, if stored apart (in `MemoryStore._bodies`)."""


@dataclass(slots=True)
class _Body:
    data: bytes
    until: float


@dataclass(frozen=True, slots=True)
class _Claim:
    token: str
    until: float
    path: str


@dataclass(slots=True)
class _Index:
    """What one path or tag names, as the Redis store's sorted sets do."""

    members: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    """digest -> (raw query, or b"" for a tag; when the entry expires)."""
    claims: dict[str, float] = field(default_factory=dict)
    """A path's running claims: digest -> end of the lease, until the job commits."""
    until: float = 0.0
    """When the newest entry added expires (0 once a hard invalidation empties `members`)."""
    writes: int = 0
    """Members and claims added since the last sweep."""

    def add(self, digest: str, query: bytes, until: float, now: float) -> None:
        self.members[digest] = (query, until)
        self.until = max(self.until, until)
        self._wrote(now)

    def claim(self, digest: str, until: float, now: float) -> None:
        self.claims[digest] = until
        self._wrote(now)

    def alive(self, now: float) -> bool:
        """An entry or a claim here may still be live."""
        return self.until > now or any(end > now for end in self.claims.values())

    def _wrote(self, now: float) -> None:
        self.writes += 1
        # Forget expired members once the writes since the last sweep reach a third of the
        # size: O(1) amortised per write, and at most about 1.5x the live members.
        if 3 * self.writes >= len(self.members) + len(self.claims):
            self.sweep(now)

    def sweep(self, now: float) -> None:
        self.writes = 0
        self.members = {digest: m for digest, m in self.members.items() if m[1] > now}
        self.claims = {digest: end for digest, end in self.claims.items() if end > now}


class _Indexes:
    """The indexes by path (the path list) or by tag; forgets those with nothing live."""

    def __init__(self) -> None:
        self.by_key: dict[str, _Index] = {}
        self._new = 0  # keys added since the last sweep

    def get(self, key: str, now: float) -> _Index:
        """The index of `key`, created if missing."""
        index = self.by_key.get(key)
        if index is None:
            # As `_Index` does with its members: a sweep once new keys reach a third.
            self._new += 1
            if 3 * self._new > len(self.by_key):
                self.sweep(now)
            index = self.by_key[key] = _Index()
        return index

    def sweep(self, now: float, members: bool = False) -> None:
        self._new = 0
        self.by_key = {key: index for key, index in self.by_key.items() if index.alive(now)}
        if members:
            for index in self.by_key.values():
                index.sweep(now)


class MemoryStore:
    """A `Store` in dicts, on the monotonic clock. No method awaits, so each is atomic."""

    def __init__(self, *, claim_ttl: float, on_stored: Callable[[str], None] | None = None) -> None:
        self._claim_ttl = claim_ttl
        # Called with each digest a commit stores: wakes `Prefer: wait` requests.
        self._on_stored = on_stored
        # An invalidation stamp matters only to jobs that began before it (see store.py).
        self._stamp_ttl = claim_ttl + 60.0
        self._entries: dict[str, _Entry] = {}
        # Bodies stored apart, by (digest, version): as in Redis, each lives as long as its
        # entry, and one replaced by a newer commit `REPLACED_BODY_GRACE` more at most.
        self._bodies: dict[tuple[str, str], _Body] = {}
        self._claims: dict[str, _Claim] = {}
        self._paths = _Indexes()  # path -> its entries; a claim registers its path too
        self._tags = _Indexes()
        self._path_stamps: dict[str, float] = {}
        self._tag_stamps: dict[str, float] = {}
        self._durations: dict[str, float] = {}  # path -> moving average, seconds
        self._writes_since_sweep = 0

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """See `Store.lookup`."""
        now = time.monotonic()
        # Entries' `stored_at` are this process's wall clock (`list_path`): so is `now`.
        wall = time.time()
        entry = self._live(digest, now)
        if entry is not None and entry.fresh_until > now:
            return Lookup(entry.value, now=wall)
        value = entry.value if entry else None
        claim = self._claims.get(digest)
        if claim is not None and claim.until > now and claim.token != token:
            stale = entry is not None
            if claim.token.startswith(BACKING_OFF):
                return Lookup(value, stale=stale, now=wall)
            held_for = now - (claim.until - self._claim_ttl)
            return Lookup(value, stale=stale, now=wall, holder=claim.token, held_for=held_for)
        self._claim(digest, token, path, now)
        self._wrote(now)
        return Lookup(value, stale=entry is not None, claimed=True, claimed_at=now, now=wall)

    def lease_left(self, claimed_at: float) -> float:
        """See `Store.lease_left`."""
        return claimed_at + self._claim_ttl - time.monotonic()

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """See `Store.begin`."""
        return await self.take_over(digest, token, token, path)

    async def take_over(self, digest: str, holder: str, token: str, path: str) -> float | None:
        """See `Store.take_over`."""
        now = time.monotonic()
        if self._holder(digest, now) not in (None, holder):
            return None
        self._claim(digest, token, path, now)
        return now

    async def list_path(self, path: str) -> float:
        """See `Store.list_path`: nothing to do, a claim here lists its path itself.

        The time is this process's wall clock, as `Lookup.now` here: the one process's.
        """
        return time.time()

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """See `Store.commit`."""
        now = time.monotonic()
        holder = self._holder(digest, now)
        if holder is None:
            # The lease ran out: refused, as RedisStore must (its path list, store.py).
            self._job_ended(write.path, digest)
            return Committed.REFUSED
        if holder == BACKING_OFF + token:
            return Committed.KEPT_STALE  # this commit, sent again
        if holder != token:
            return Committed.REFUSED
        stamps = [self._path_stamps.get(write.path)]
        stamps += [self._tag_stamps.get(tag) for tag in write.tags]
        if any(stamp is not None and stamp >= started for stamp in stamps):
            self._claims.pop(digest, None)
            self._job_ended(write.path, digest)
            return Committed.REFUSED
        if write.failed and self._live(digest, now) is not None:
            # The claim stays as a back-off marker; no job runs under it, and it says so.
            marker = BACKING_OFF + token
            self._claims[digest] = _Claim(marker, now + write.retry_after, write.path)
            self._job_ended(write.path, digest)
            return Committed.KEPT_STALE
        until = now + write.keep
        replaced = self._entries.get(digest)
        if replaced is not None and replaced.version is not None:
            kept = self._bodies.get((digest, replaced.version))
            if kept is not None:
                kept.until = min(kept.until, now + REPLACED_BODY_GRACE)
        version = None
        if write.body is not None:
            version = write.body.version
            # In process, the body need not be cut in pieces: joined once, here.
            self._bodies[(digest, version)] = _Body(b"".join(write.body.chunks), until)
        self._entries[digest] = _Entry(write.entry, now + write.fresh, until, version)
        self._claims.pop(digest, None)
        self._job_ended(write.path, digest)
        self._paths.get(write.path, now).add(digest, write.query, until, now)
        for tag in write.tags:
            self._tags.get(tag, now).add(digest, b"", until, now)
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
            self._job_ended(self._claims.pop(digest).path, digest)

    async def back_off(self, digest: str, token: str) -> None:
        """See `Store.back_off`."""
        claim = self._claims.get(digest)
        if claim is not None and claim.token == token and claim.until > time.monotonic():
            self._claims[digest] = _Claim(BACKING_OFF + token, claim.until, claim.path)

    async def discard(self, digest: str, version: str | None = None) -> None:
        """See `Store.discard`."""
        entry = self._entries.get(digest)
        if entry is None or (version is not None and entry.version not in (None, version)):
            return
        self._forget(digest)

    async def read_body(
        self, digest: str, version: str, length: int, start: int, stop: int
    ) -> bytes | None:
        """See `Store.read_body`."""
        body = self._bodies.get((digest, version))
        if body is None or body.until <= time.monotonic() or len(body.data) != length:
            return None
        return body.data[start:stop]

    async def typical_duration(self, path: str) -> float | None:
        """See `Store.typical_duration`."""
        return self._durations.get(path)

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """See `Store.invalidate`."""
        now = time.monotonic()
        if isinstance(target, ByTag):
            self._tag_stamps[target.tag] = now
            tagged = self._tags.by_key.get(target.tag)
            if tagged is None:
                return 0
            count = self._drop(list(tagged.members), soft, now)
            if not soft:
                del self._tags.by_key[target.tag]
            return count
        if isinstance(target, ByGlob):
            paths = [path for path in self._paths.by_key if target.matches(path)]
        else:
            paths = [target.path]
        count = 0
        for path in paths:
            self._path_stamps[path] = now
            index = self._paths.by_key.get(path)
            if index is None:
                continue
            if isinstance(target, ByQuery):
                chosen = [
                    digest
                    for digest, (query, _) in index.members.items()
                    if query_matches(query, target.params)
                ]
            else:
                chosen = list(index.members)
            count += self._drop(chosen, soft, now)
            if not soft:
                for digest in chosen:
                    del index.members[digest]
                if not index.members:
                    index.until = 0.0  # the path lives on only while claims of it run
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
                self._forget(digest)
        return count

    def _forget(self, digest: str) -> None:
        """Delete an entry and its body stored apart, if any."""
        entry = self._entries.pop(digest)
        if entry.version is not None:
            self._bodies.pop((digest, entry.version), None)

    def _live(self, digest: str, now: float) -> _Entry | None:
        entry = self._entries.get(digest)
        return entry if entry is not None and entry.keep_until > now else None

    def entries_by_path(self) -> dict[str, int]:
        """How many live entries each path holds (paths with none left out): the dashboard."""
        now = time.monotonic()
        counted = {
            path: sum(1 for _, until in index.members.values() if until > now)
            for path, index in self._paths.by_key.items()
        }
        return {path: count for path, count in counted.items() if count}

    def _holder(self, digest: str, now: float) -> str | None:
        claim = self._claims.get(digest)
        return claim.token if claim is not None and claim.until > now else None

    def _claim(self, digest: str, token: str, path: str, now: float) -> None:
        until = now + self._claim_ttl
        self._claims[digest] = _Claim(token, until, path)
        # The path is listed while the job runs, so a glob invalidation meanwhile stamps it.
        self._paths.get(path, now).claim(digest, until, now)

    def _job_ended(self, path: str, digest: str) -> None:
        index = self._paths.by_key.get(path)
        if index is not None:
            index.claims.pop(digest, None)

    def _wrote(self, now: float) -> None:
        # Expired items are dropped lazily: a full sweep once writes reach half the size,
        # so memory stays proportional to live items at O(1) amortised cost per write.
        self._writes_since_sweep += 1
        if self._writes_since_sweep * 2 < len(self._entries) + len(self._claims):
            return
        self._writes_since_sweep = 0
        self._entries = {key: e for key, e in self._entries.items() if e.keep_until > now}
        self._bodies = {key: b for key, b in self._bodies.items() if b.until > now}
        self._claims = {key: c for key, c in self._claims.items() if c.until > now}
        # Each index also sweeps itself as it is written; this catches the idle ones.
        self._paths.sweep(now, members=True)
        self._tags.sweep(now, members=True)
        horizon = now - self._stamp_ttl
        self._path_stamps = {p: at for p, at in self._path_stamps.items() if at > horizon}
        self._tag_stamps = {t: at for t, at in self._tag_stamps.items() if at > horizon}


class InProcessQueue:
    """A `JobQueue` that runs jobs as asyncio tasks in this process, `max_jobs` at a time."""

    def __init__(
        self, run: Callable[[Job], Awaitable[object]], *, max_jobs: int, max_queued: int = 0
    ) -> None:
        self._run = run
        self._max_jobs = max_jobs
        self._max_queued = max_queued
        self._slots = asyncio.Semaphore(max_jobs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished = 0
        """Jobs ended so far; `drain` reports those ended since it last did."""
        self._reported = 0
        self._waiting: dict[str, None] = {}
        """Ids of the jobs waiting for a slot, in the order they get one (FIFO)."""
        self._running: dict[str, RunningJob] = {}
        """The jobs holding a slot now, by job id (`running`)."""
        self._progress: dict[str, Progress] = {}
        """The latest progress of each job that reported some, until shortly after it ends."""

    async def enqueue(self, job: Job) -> None:
        """See `JobQueue.enqueue`: starts the job and returns at once.

        `QueueFull` when `max_queued` jobs already wait for one of the `max_jobs` slots.
        """
        waiting = len(self._tasks) - self._max_jobs
        if self._max_queued and waiting >= self._max_queued:
            raise QueueFull(f"{waiting} in-process jobs wait for a slot")
        task = asyncio.create_task(self._guarded(job), name=f"asgi-worker {job.job_id}")
        self._waiting[job.job_id] = None
        self._tasks.add(task)  # a strong reference, or the loop may drop the task
        task.add_done_callback(self._tasks.discard)

    async def lost(self, job_id: str) -> bool:
        """See `JobQueue.lost`: never; a job here ends with this process, or runs."""
        return False

    async def running(self, limit: int = 100) -> list[RunningJob]:
        """See `JobQueue.running`: the jobs holding a slot, with their latest progress."""
        return [
            RunningJob(job.job_id, job.path, self._progress.get(job.job_id))
            for job in list(self._running.values())[:limit]
        ]

    @property
    def pending(self) -> int:
        """Jobs enqueued and not finished."""
        return len(self._tasks)

    async def drain(self) -> int:
        """Wait until no job is left, including jobs enqueued meanwhile.

        Returns how many jobs ended since the last drain, whether they ended before this
        one began or while it waited. The jobs may run on another event loop than this
        one (Starlette's `TestClient` serves the app on a loop of its own, in a thread):
        those are watched until they are done, not awaited.
        """
        loop = asyncio.get_running_loop()
        while pending := {task for task in set(self._tasks) if not task.done()}:
            if all(task.get_loop() is loop for task in pending):
                await asyncio.gather(*pending, return_exceptions=True)
            else:
                await asyncio.sleep(_WATCH_EVERY)
        ended, self._reported = self._finished - self._reported, self._finished
        return ended

    async def close(self) -> None:
        """Cancel the jobs still running (their claims lapse, so the requests re-claim)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def state(self, job_id: str) -> JobState | None:
        """See `JobQueue.state`."""
        if job_id in self._running:
            return JobState("running", None, self._progress.get(job_id))
        if job_id in self._waiting:
            return JobState("queued", list(self._waiting).index(job_id))
        return None

    async def report(self, job_id: str, progress: Progress, *, ended: bool = False) -> None:
        """See `JobQueue.report`: kept in memory, for `KEEP_AFTER_END` once `ended`."""
        self._progress[job_id] = progress
        if ended:
            loop = asyncio.get_running_loop()
            loop.call_later(KEEP_AFTER_END, self._forget_progress, job_id, progress)

    def _forget_progress(self, job_id: str, progress: Progress) -> None:
        if self._progress.get(job_id) is progress:
            del self._progress[job_id]

    async def _guarded(self, job: Job) -> None:
        try:
            await self._slots.acquire()
        finally:
            self._waiting.pop(job.job_id, None)  # cancelled while waiting: out of the line
        self._running[job.job_id] = RunningJob(job.job_id, job.path)
        try:
            await self._run(job)
        except Exception:
            # run_job stores an error response for app failures; this is the store
            # failing under it. The claim lapses and a later request re-claims.
            logger.exception("asgi-worker: in-process job %s failed", job.job_id)
        finally:
            del self._running[job.job_id]
            self._finished += 1
            self._slots.release()
