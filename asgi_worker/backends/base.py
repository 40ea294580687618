"""The two protocols every backend implements, and the values they pass.

`Store`: where entries, claims and invalidation indexes live (`backends.memory` keeps
them in the process, `backends.redis.store` in Redis). `JobQueue`: where the middleware
hands jobs to workers (in-process tasks, or arq's queue). The middleware and the worker
speak only these; a backend passes the same behaviour suite (tests/test_behaviour.py,
tests/test_store_contract.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, Protocol

from asgi_worker.core.invalidation_targets import Target
from asgi_worker.core.progress import Progress


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer of `Store.lookup`."""

    entry: bytes | None = None
    """The stored entry (fresh or stale), or None on a miss."""
    stale: bool = False
    """The entry is past its freshness (served while one refresh runs)."""
    claimed: bool = False
    """This lookup took the claim: the caller must enqueue the job."""
    claimed_at: float | None = field(default=None, compare=False)
    """When the claim was taken, on the store's clock: the job's start time for `commit`
    (and `Store.lease_left`). Set exactly when `claimed` is."""
    now: float = field(default=0.0, compare=False)
    """The store's time at the lookup, in Unix seconds (Redis's `TIME`): an entry's age is
    this minus its `stored_at`, which is on the same clock (`Store.list_path`)."""
    holder: str | None = field(default=None, compare=False)
    """The token of the claim another request holds, whose job should be running: set
    on a miss or a stale hit that did not claim, unless the claim is a back-off marker
    (no job runs under it). See `Store.take_over`."""
    held_for: float = field(default=0.0, compare=False)
    """Seconds `holder` has held the claim (its lease taken or renewed), by the store's
    clock."""


REPLACED_BODY_GRACE = 60.0
"""Seconds a body stored apart is kept after a newer commit replaced its entry (at most:
no longer than it had left), so that hits still streaming it can finish."""


@dataclass(frozen=True, slots=True)
class Body:
    """A body stored apart from its entry (`Write.body`, `Config.stream_body_bytes`)."""

    version: str
    """Names the body's key (`codec.Apart.version`): one per stored response."""
    chunks: tuple[bytes, ...]
    """The body, in the chunks the app sent: written as they are, never joined."""
    length: int


@dataclass(frozen=True, slots=True)
class Write:
    """What a job stores, and for how long."""

    entry: bytes
    """The encoded response, or only its head if its body is stored apart (`body`)."""
    fresh: float
    """Seconds the entry is fresh."""
    keep: float
    """Seconds the entry is kept in all: `fresh` plus the stale window."""
    path: str
    query: bytes
    tags: tuple[str, ...] = ()
    failed: bool = False
    """An error response: if a stale copy exists, keep serving it instead (RFC 5861
    stale-if-error) and try again after `retry_after` seconds."""
    retry_after: float = 1.0
    duration: float | None = None
    """Seconds the app took; folded into the path's typical duration (adaptive Retry-After)."""
    body: Body | None = None
    """A large body, stored apart from `entry` (its head). It lives exactly as long as the
    entry: it expires, is invalidated and is replaced with it (a replaced one is kept
    `REPLACED_BODY_GRACE` more at most, for the hits still reading it)."""


BACKING_OFF = "!"
"""How a claim kept as a back-off marker starts (`Write.failed`): no token does."""


class Committed(enum.Enum):
    """What became of a `Store.commit`."""

    STORED = "stored"
    KEPT_STALE = "kept-stale"
    """The job failed; the stale copy stays, and the next refresh waits `retry_after`."""
    REFUSED = "refused"
    """An invalidation came after the job began, or a newer claim took over: not stored."""


class Store(Protocol):
    """Where entries, claims and indexes live. Implementations keep each method atomic."""

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """Return the entry; claim the key for `token` if it is missing or stale and free.

        `path` is the request's: its claim counts in the path's index while the job runs
        (the job lists the path itself, `list_path`).
        """
        ...

    def lease_left(self, claimed_at: float) -> float:
        """Seconds left of a lease taken at `claimed_at`, by this process's clock (no I/O)."""
        ...

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """Renew the claim of a job about to run; return the store's time, None if lost.

        Needed only when the lease may run out before the job ends (see `lease_left`).
        """
        ...

    async def take_over(self, digest: str, holder: str, token: str, path: str) -> float | None:
        """Claim the key for `token` if `holder` still holds it (or nobody does).

        For a request that found the job of `holder` lost (`JobQueue.lost`): it then
        enqueues a job, as a lookup that claimed does. Returns the claim time, as
        `Lookup.claimed_at`, or None if another request holds the claim now.
        """
        ...

    async def list_path(self, path: str) -> float:
        """Make `path` findable by prefix and glob invalidation; return the store's time.

        A job calls it before its app runs, so an invalidation that misses the path
        began before the app ran. The time (Unix seconds, the clock of `Lookup.now`) is
        where the job counts its entry's `stored_at` from, by its own monotonic clock.
        """
        ...

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """Store the job's result (see `Write`, `Committed`) and release the claim.

        Only under the job's own live claim: a job that outlived its lease is refused.
        """
        ...

    async def release(self, digest: str, token: str) -> None:
        """Give up the claim `token` holds (e.g. the job could not be enqueued)."""
        ...

    async def back_off(self, digest: str, token: str) -> None:
        """Keep the claim `token` holds until its lease ends, with no job behind it.

        For a job that failed for good: the next request's job would fail the same way,
        so it waits for the lease (the claim is a back-off marker, see `Write.failed`).
        """
        ...

    async def discard(self, digest: str, version: str | None = None) -> None:
        """Delete the stored entry and its body (e.g. it could not be decoded).

        With `version` (its body's, found gone): only if the entry's body is still that
        one, so that a response a newer commit stored meanwhile stays.
        """
        ...

    async def read_body(
        self, digest: str, version: str, length: int, start: int, stop: int
    ) -> bytes | None:
        """Bytes `start` to `stop` (excluded) of the body stored apart under `version`.

        None if that body is gone (expired, invalidated, evicted, replaced a while ago)
        or is not `length` bytes long. `stop` is at most `length`.
        """
        ...

    async def typical_duration(self, path: str) -> float | None:
        """Seconds jobs for `path` have recently taken (a moving average), if known."""
        ...

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """Expire the entries `target` selects: delete them, or if `soft` mark them stale.

        Returns how many entries were affected. Stamps before it expires anything (a job
        that began earlier is refused at commit); on Redis it then runs in short steps,
        not atomically (see the module docstring).
        """
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """One replay to run: the encoded request snapshot and the claim it runs under."""

    job_id: str
    snapshot: bytes
    token: str
    claimed_at: float
    """`Lookup.claimed_at` of the claim: the job's start time (see `jobs.run_job`)."""
    path: str = ""
    """The request's path: jobs of one path share a fair-queueing clock."""
    trace: str | None = None
    """The W3C `traceparent` of the enqueuing request's span, with tracing on."""


@dataclass(frozen=True, slots=True)
class JobState:
    """Where one job stands, as `JobQueue.state` reads it (a `202`'s JSON body)."""

    status: Literal["queued", "running"]
    position: int | None = None
    """Jobs due before it on the queue (0: next), while queued; None where not known."""
    progress: Progress | None = None
    """What its handler last reported (`asgi_worker.report_progress`), if anything."""


@dataclass(frozen=True, slots=True)
class RunningJob:
    """A job a worker runs now, as `JobQueue.running` lists it (the dashboard)."""

    job_id: str
    path: str
    """The request's path ("" if the queue cannot tell)."""
    progress: Progress | None = None


class QueueFull(Exception):
    """The queue holds `Config.max_queued` jobs, or the path's jobs would not start in time."""


class JobQueue(Protocol):
    """Where the middleware hands jobs to workers."""

    async def enqueue(self, job: Job) -> None:
        """Make the job run once, soon; `QueueFull` if it cannot be taken now."""
        ...

    async def lost(self, job_id: str) -> bool:
        """Whether the job is lost: gone, or in progress under a worker that is gone.

        A lost job is removed, so that nothing runs it later: the caller may take its
        claim over (`Store.take_over`) and enqueue it again. A job that is queued, or
        running, is not lost.
        """
        ...

    async def state(self, job_id: str) -> JobState | None:
        """Whether the job is queued or running, and its progress; None if it is neither.

        One round trip at most: a `202` asks it only when the client accepts JSON.
        """
        ...

    async def report(self, job_id: str, progress: Progress, *, ended: bool = False) -> None:
        """Keep `progress` as the job's latest (`ended`: its last, kept briefly).

        `worker/progress.py` calls it at most every `progress.WRITE_EVERY` seconds a job.
        """
        ...

    async def running(self, limit: int = 100) -> list[RunningJob]:
        """Up to `limit` jobs running now, with their progress (the dashboard)."""
        ...
