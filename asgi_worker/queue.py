"""The `JobQueue` protocol and `ArqQueue`, which puts replay jobs on an arq queue.

Jobs are msgpack-encoded, not pickled (arq's default): the worker never unpickles bytes
that anyone able to write to Redis could have put there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job

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


class JobQueue(Protocol):
    """Where the middleware hands jobs to workers."""

    async def enqueue(self, job: Job) -> None:
        """Make the job run once, soon."""
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
    """A `JobQueue` on arq, enqueueing in one round trip.

    arq's own `enqueue_job` takes three (WATCH, EXISTS, MULTI/EXEC) to refuse duplicate
    job ids. Our job ids hold the claim token, so they are unique by construction and a
    plain MULTI/EXEC writing what `enqueue_job` writes is enough.
    """

    def __init__(self, redis: ArqRedis, *, queue_name: str, expires: float) -> None:
        self._redis = redis
        self._queue_name = queue_name
        # A job still queued after its claim expired is stale: another request has
        # claimed and enqueued again by then, so arq may drop it.
        self._expires_ms = max(1, round(expires * 1000))

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
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.psetex(job_key_prefix + job.job_id, self._expires_ms, payload)
            pipe.zadd(self._queue_name, {job.job_id: now_ms})
            await pipe.execute()
