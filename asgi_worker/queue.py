"""The `JobQueue` protocol and `ArqQueue`, which puts replay jobs on an arq queue.

Jobs are msgpack-encoded, not pickled (arq's default): the worker never unpickles bytes
that anyone able to write to Redis could have put there.

Admission and fairness happen at enqueue, in the same one round trip:

- `max_queued` caps the jobs in the queue; one more raises `QueueFull` (the client gets
  a 503), so a cache-busting flood cannot grow the queue without bound.
- Fair queueing: arq runs jobs in order of their score (the time they are due). Each
  path keeps a clock of when its next job is due: a job is scored at `max(now, clock)`
  and moves the clock on by the path's typical job duration over the worker's slots, so
  a path can fill the slots but not build a backlog of jobs that are due at once. A
  flood of distinct URLs on one path is spread into the future; a cold URL of another
  path is due at once and runs as soon as a slot frees. A job that could not start
  within its claim lease is not queued (`QueueFull`): it would only expire unrun.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

from .scripts import ENQUEUE

JOB_FUNCTION = "asgi_worker.replay"
"""The name the replay job is registered under in the arq worker."""


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


class QueueFull(Exception):
    """The queue holds `Config.max_queued` jobs, or the path's jobs would not start in time."""


class JobQueue(Protocol):
    """Where the middleware hands jobs to workers."""

    async def enqueue(self, job: Job) -> None:
        """Make the job run once, soon; `QueueFull` if it cannot be taken now."""
        ...


def serialize(data: dict[str, Any]) -> bytes:
    """Arq `job_serializer`: msgpack; anything msgpack cannot hold becomes its repr."""
    packed: bytes = msgpack.packb(data, use_bin_type=True, default=repr)
    return packed


def deserialize(data: bytes) -> dict[str, Any]:
    """Arq `job_deserializer`: the inverse of `serialize`."""
    unpacked: dict[str, Any] = msgpack.unpackb(data, raw=False)
    return unpacked


class ArqQueue:
    """A `JobQueue` on arq, enqueueing in one round trip (one script).

    arq's own `enqueue_job` takes three (WATCH, EXISTS, MULTI/EXEC) to refuse duplicate
    job ids. Our job ids hold the claim token, so they are unique by construction; the
    script writes what `enqueue_job` writes, after the admission checks of the module doc.
    """

    def __init__(
        self,
        redis: ArqRedis,
        *,
        queue_name: str,
        expires: float,
        prefix: str,
        max_queued: int = 0,
        fair_slots: int = 0,
        horizon: float = 0.0,
    ) -> None:
        """`fair_slots` is the worker's `max_jobs` (0 turns fair queueing off).

        `horizon` is how far in the future a job may be scored and still start within
        its claim lease.
        """
        self._redis = redis
        self._queue_name = queue_name
        # A job still queued after its claim expired is stale: another request has
        # claimed and enqueued again by then, so arq may drop it.
        self._expires_ms = max(1, round(expires * 1000))
        self._prefix = prefix
        self._max_queued = max_queued
        self._fair_slots = fair_slots
        self._horizon_ms = max(0, round(horizon * 1000))
        self._script = redis.register_script(ENQUEUE)

    async def enqueue(self, job: Job) -> None:
        """See `JobQueue.enqueue`."""
        now_ms = round(time.time() * 1000)
        payload = serialize_job(
            JOB_FUNCTION,
            (job.snapshot, job.token, job.claimed_at),
            {},
            None,
            now_ms,
            serializer=serialize,
        )
        path = job.path.encode("utf-8", "surrogatepass")
        clock = f"{self._prefix}:clock:{hashlib.sha1(path, usedforsecurity=False).hexdigest()}"
        keys = [job_key_prefix + job.job_id, self._queue_name, clock, f"{self._prefix}:durations"]
        arguments: list[bytes | str | int] = [
            payload,
            self._expires_ms,
            now_ms,
            job.job_id,
            self._max_queued,
            self._fair_slots,
            self._horizon_ms,
            path,
        ]
        if await self._script(keys, arguments) is None:
            raise QueueFull(f"the queue {self._queue_name!r} cannot take a job of {job.path}")
