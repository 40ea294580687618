"""`ArqQueue`: the `JobQueue` protocol (backends/base.py) on an arq queue.

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

Each enqueue also pushes a token on the queue's wake list, which an idle `ReplayWorker`
blocks on (see `worker/job_taker.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
from arq.connections import ArqRedis
from arq.constants import (
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asgi_worker.backends.base import Job, JobState, QueueFull, RunningJob
from asgi_worker.backends.redis.clients import client_url
from asgi_worker.backends.redis.queue_scripts import ENQUEUE, FIND_LOST, WAKE_TOKENS
from asgi_worker.backends.redis.retries import Throttle
from asgi_worker.backends.redis.script_runner import Script
from asgi_worker.core.codec import peek_snapshot
from asgi_worker.core.keys import RedisKeys, alive_prefix, request_line, wake_key
from asgi_worker.core.progress import KEEP_AFTER_END, Progress

logger = logging.getLogger("asgi_worker")

JOB_FUNCTION = "asgi_worker.replay"
"""The name the replay job is registered under in the arq worker."""


def serialize(data: dict[str, Any]) -> bytes:
    """Arq `job_serializer`: msgpack; anything msgpack cannot hold becomes its repr."""
    packed: bytes = msgpack.packb(data, use_bin_type=True, default=repr)
    return packed


def deserialize(data: bytes) -> dict[str, Any]:
    """Arq `job_deserializer`: the inverse of `serialize`.

    A replay job's snapshot comes back as a `SnapshotBytes`: arq logs each job's
    arguments with `repr`, and the request reads better there than its msgpack.
    """
    unpacked: dict[str, Any] = msgpack.unpackb(data, raw=False)
    arguments = unpacked.get("a")
    if (
        unpacked.get("f") == JOB_FUNCTION
        and isinstance(arguments, list)
        and arguments
        and isinstance(arguments[0], bytes)
    ):
        arguments[0] = SnapshotBytes(arguments[0])
    return unpacked


def _job_path(payload: bytes | None) -> str:
    """The request path of a replay job's arq payload; "" if it is gone or unreadable."""
    if payload is None:
        return ""
    try:
        arguments = deserialize(payload).get("a")
        return peek_snapshot(bytes(arguments[0])).path if arguments else ""
    except Exception:  # written by another version, or not ours: no path, never an error
        return ""


class SnapshotBytes(bytes):
    """An encoded request snapshot whose `repr` is the request: `GET /path?query`.

    Still the very bytes (`run_job` decodes them); only what arq's job-start log line
    shows changes. Credentials (sealed in the snapshot) and `vary` headers are not shown.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        try:
            return request_line(peek_snapshot(bytes(self)))
        except Exception:  # a repr for a log line must not raise
            return f"<unreadable request snapshot, {len(self)} bytes>"


ALIVE_FOR = 5.0
"""Seconds a worker's heartbeat key lives: renewed every second while it runs jobs
(heartbeat.py), so a job in progress under an expired one, and taken longer ago than
this, has lost its worker."""

# Keys per SCAN step when listing the running jobs.
_SCAN_BATCH = 1000
# How often a web process reads the queue's Redis's INFO, to say why jobs are gone.
_CAUSE_READ_EVERY = 60.0
_NO_EVICTION = (
    "Give the queue a Redis that never evicts (maxmemory-policy noeviction; its own with "
    "Config.queue_redis_url): see docs/failure-modes.md#a-redis-that-evicts"
)

HEALTH_REPORT_INTERVAL = 60.0
"""How often our worker writes arq's health-check key (worker/settings.py `_HEALTH_CHECK_INTERVAL`).

arq writes it with a lifetime of the interval + 1 s: a key present means a worker on the
queue reported within that time."""
NO_WORKER_AFTER = 2 * HEALTH_REPORT_INTERVAL + 10.0
"""Seconds without a worker's report after which the web process says there is none. A
busy worker (all `max_jobs` slots taken) may miss a report, hence twice the interval."""
WORKER_CHECK_EVERY = 10.0
"""A web process reads the health-check key at most this often (and only on a 202)."""


class WorkerWatch:
    """Whether any worker serves the queue, from arq's health-check key, read throttled.

    The key's absence shows only that no worker reported within its lifetime; the
    silence is counted from the first check that found it absent, plus that lifetime.
    Past `NO_WORKER_AFTER`, `missing` is true and a WARNING naming the queue is logged,
    once per report interval while it lasts.
    """

    def __init__(
        self,
        redis: ArqRedis,
        queue_name: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._queue_name = queue_name
        self._key = queue_name + health_check_key_suffix
        self._clock = clock
        self._checked_at: float | None = None
        self._checking = False
        self._absent_since: float | None = None
        self._warned_at: float | None = None
        self.missing = False
        """The last check's answer: no worker has reported for too long."""

    async def check(self, within: float) -> bool:
        """`missing`, read again from Redis if the last read is `WORKER_CHECK_EVERY` old.

        Concurrent callers do not wait for a read on its way: they get the last answer.
        A read takes at most `within` seconds (none at all if that is not positive); a
        Redis error keeps the last answer (the request's own lookup reports those).
        """
        now = self._clock()
        due = self._checked_at is None or now - self._checked_at >= WORKER_CHECK_EVERY
        if self._checking or not due or within <= 0:
            return self.missing
        self._checking = True
        try:
            async with asyncio.timeout(within):
                ttl_ms = await self._redis.pttl(self._key)
        except (RedisError, OSError, TimeoutError) as error:
            logger.debug("asgi-worker: could not read %s: %r", self._key, error)
            return self.missing
        finally:
            self._checking = False
            self._checked_at = now
        self._update(int(ttl_ms), now)
        return self.missing

    def _update(self, ttl_ms: int, now: float) -> None:
        if ttl_ms != -2:  # -2: no such key; -1 (no expiry) or a lifetime: reported
            if self.missing:
                logger.info("asgi-worker: a worker reports on queue %r again", self._queue_name)
            self._absent_since = None
            self.missing = False
            return
        if self._absent_since is None:
            self._absent_since = now
        silent = now - self._absent_since + HEALTH_REPORT_INTERVAL + 1
        self.missing = silent > NO_WORKER_AFTER
        if not self.missing:
            return
        if self._warned_at is None or now - self._warned_at >= HEALTH_REPORT_INTERVAL:
            self._warned_at = now
            logger.warning(
                "asgi-worker: no worker has reported on queue %r for over %d s: misses are "
                "queued and answered 202, but nothing runs them (start one: asgi-worker "
                "worker MODULE:APP)",
                self._queue_name,
                silent,
                extra={"queue": self._queue_name, "silent_seconds": round(silent)},
            )


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
        self._script = Script(redis, ENQUEUE)
        self._find_lost = Script(redis, FIND_LOST)
        self._alive_prefix = alive_prefix(queue_name)
        self._gone = Throttle()
        self._silent = Throttle()
        self._cause: tuple[float, str] | None = None  # (when read, the likely cause)
        self._wake_key = wake_key(queue_name)
        self._keys = RedisKeys(prefix)
        self.worker_watch = WorkerWatch(redis, queue_name)
        """Whether a worker serves the queue (see `WorkerWatch`)."""

    async def enqueue(self, job: Job) -> None:
        """See `JobQueue.enqueue`."""
        now_ms = round(time.time() * 1000)
        arguments_of_job: tuple[object, ...] = (job.snapshot, job.token, job.claimed_at)
        if job.trace is not None:  # only then: without tracing the job is as it always was
            arguments_of_job += (job.trace,)
        payload = serialize_job(
            JOB_FUNCTION,
            arguments_of_job,
            {},
            None,
            now_ms,
            serializer=serialize,
        )
        path = job.path.encode("utf-8", "surrogatepass")
        keys_of = RedisKeys(self._prefix)
        keys = [
            job_key_prefix + job.job_id,
            self._queue_name,
            keys_of.fair_clock(job.path),
            keys_of.durations(job.path),
            self._wake_key,
        ]
        arguments: list[bytes | str | int] = [
            payload,
            self._expires_ms,
            0,  # now: Redis's clock (see queue_scripts)
            job.job_id,
            self._max_queued,
            self._fair_slots,
            self._horizon_ms,
            path,
            WAKE_TOKENS,
        ]
        if await self._script(keys, arguments) is None:
            raise QueueFull(f"the queue {self._queue_name!r} cannot take a job of {job.path}")

    async def lost(self, job_id: str) -> bool:
        """See `JobQueue.lost`: one script on the queue's Redis (`FIND_LOST`).

        A job found lost is logged: a WARNING that says why, a line per 10 s at most.
        """
        found = await self._find_lost(
            [job_key_prefix + job_id, in_progress_key_prefix + job_id, self._queue_name],
            [
                job_id,
                self._alive_prefix,
                retry_key_prefix + job_id,
                self._expires_ms,
                round(ALIVE_FOR * 1000),
            ],
        )
        why = found.decode() if isinstance(found, bytes) else str(found)
        if why == "gone":
            self._gone.log(
                logging.WARNING,
                "asgi-worker: job %s was gone from queue %r while its claim held; its "
                "request is queued again. %s",
                job_id,
                self._queue_name,
                await self._why_gone(),
            )
        elif why == "silent":
            self._silent.log(
                logging.WARNING,
                "asgi-worker: job %s was in progress under a worker that has not reported "
                "for %g s (killed or frozen, or the job's end was lost in a failover): its "
                "request is queued again",
                job_id,
                ALIVE_FOR,
            )
        return why in ("gone", "silent", "lost")

    async def running(self, limit: int = 100) -> list[RunningJob]:
        """See `JobQueue.running`: arq's in-progress keys, then one pipeline.

        The keyspace walk (`SCAN`, in batches) stops at `limit` jobs; the pipeline reads
        each job's arq key (its request's path) and its progress hash.
        """
        keys = RedisKeys(self._prefix)
        job_ids: list[str] = []
        in_progress = in_progress_key_prefix + keys.job_ids_pattern()
        async for key in self._redis.scan_iter(match=in_progress, count=_SCAN_BATCH):
            job_ids.append(key.decode()[len(in_progress_key_prefix) :])
            if len(job_ids) >= limit:
                break
        if not job_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipeline:
            for job_id in job_ids:
                pipeline.get(job_key_prefix + job_id)
                pipeline.hgetall(keys.progress(job_id))
            found = await pipeline.execute()
        return [
            RunningJob(job_id, _job_path(payload), Progress.from_fields(progress))
            for job_id, payload, progress in zip(job_ids, found[::2], found[1::2], strict=True)
        ]

    async def _why_gone(self) -> str:
        """The likely cause of jobs gone from the queue, from the queue's Redis's INFO.

        Read at most once per `_CAUSE_READ_EVERY` s; a Redis that will not tell (INFO
        refused) gets the likely causes all named.
        """
        now = time.monotonic()
        if self._cause is not None and now - self._cause[0] < _CAUSE_READ_EVERY:
            return self._cause[1]
        where = client_url(self._redis)
        try:
            info = await self._redis.info()
            policy = str(info.get("maxmemory_policy", ""))
            evicted = int(info.get("evicted_keys", 0))
        except (RedisError, OSError, TimeoutError, ValueError):
            policy, evicted = "", 0
        if policy == "noeviction":
            cause = (
                f"Not evicted (the queue's Redis at {where} has maxmemory-policy "
                "noeviction): lost in a restart or a failover, or deleted"
            )
        elif policy:
            cause = (
                f"Most likely evicted: the queue's Redis at {where} evicts keys under "
                f"maxmemory-policy {policy} ({evicted} keys evicted since it started). "
                f"{_NO_EVICTION}"
            )
        else:
            cause = (
                f"Evicted by the queue's Redis at {where} under its maxmemory-policy, or "
                f"lost in a restart or a failover. {_NO_EVICTION}"
            )
        self._cause = (now, cause)
        return cause

    async def state(self, job_id: str) -> JobState | None:
        """See `JobQueue.state`: one pipeline (arq's in-progress key, the queue, progress)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.zrank(self._queue_name, job_id)
            pipe.hgetall(self._keys.progress(job_id))
            running, rank, fields = await pipe.execute()
        progress = Progress.from_fields(fields) if fields else None
        if running:
            return JobState("running", None, progress)
        if rank is not None:
            return JobState("queued", int(rank), progress)
        return None

    async def report(self, job_id: str, progress: Progress, *, ended: bool = False) -> None:
        """See `JobQueue.report`."""
        await write_progress(
            self._redis, self._keys.progress(job_id), progress, ended, self._expires_ms
        )


async def write_progress(
    redis: Redis, key: str, progress: Progress, ended: bool, lifetime_ms: int
) -> None:
    """Replace the job's progress hash at `key`: one MULTI, one round trip.

    It lives `lifetime_ms` (the job's longest run), or `KEEP_AFTER_END` once `ended`.
    """
    lifetime = round(KEEP_AFTER_END * 1000) if ended else lifetime_ms
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)  # a message reported earlier must not outlive one without
        pipe.hset(key, mapping=progress.fields())
        pipe.pexpire(key, lifetime)
        await pipe.execute()
