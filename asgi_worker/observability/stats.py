"""`collect_stats`: what the cache and its queue hold now, for `asgi-worker stats`.

Read-only. Counting entries and claims walks the keyspace with `SCAN` (in batches, so
Redis keeps serving meanwhile): on a large keyspace that takes a while, never a lock.
`check_queue` (for `asgi-worker stats --check`, a liveness probe) reads two keys only.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from arq.constants import health_check_key_suffix, in_progress_key_prefix
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from asgi_worker.core.config import Config
from asgi_worker.core.keys import RedisKeys

_SCAN_BATCH = 1000
_SLOWEST = 10

DEFAULT_MAX_AGE = 300.0
"""`stats --check`: the oldest queued job may be this many seconds past its due time."""


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of one cache (one `Config.prefix`) and its arq queue."""

    stored: int
    """Stored responses (fresh and stale, error responses and hit-for-pass markers)."""
    fresh: int
    """Of those, the ones still fresh."""
    claims: int
    """Claims held: jobs queued or running, or leases of dead workers not yet run out."""
    queued: int
    """Jobs in the arq queue, the running ones included (arq removes a job as it ends)."""
    running: int
    """Jobs a worker has taken and not finished (arq's in-progress keys)."""
    paths: int
    """Paths in the index that prefix and glob invalidation search."""
    slowest: tuple[tuple[str, float], ...]
    """Paths with the longest typical job duration, in seconds (adaptive Retry-After)."""
    worker_health: str | None
    """The last health report a worker on this queue wrote (arq's), if one is current."""
    seconds: float
    """How long collecting took."""
    oldest_queued: float | None = None
    """Seconds since the earliest job in the queue was due (a running one included);
    None with an empty queue."""

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON."""
        return dataclasses.asdict(self)


async def collect_stats(config: Config, store: Redis | RedisCluster, queue: Redis) -> Stats:
    """Count what `config`'s cache holds and its queue's jobs (`asgi-worker stats`).

    Read-only. Counting walks the keyspace with `SCAN` in batches: on a large keyspace
    that takes a while, but never blocks Redis.

    Args:
        config: The app's `Config` (its `prefix` and queue are counted).
        store: A client on `config.redis_url`, a Redis Cluster client included.
        queue: A client on the queue's Redis; the same client as `store` where one
            Redis holds both. Both must return bytes, as `Redis.from_url(url)` does by
            default (not `decode_responses=True`).

    Returns:
        The counts.
    """
    began = time.perf_counter()
    keys = RedisKeys(config.prefix)
    stored = fresh = claims = 0
    duration_keys: list[bytes] = []
    # One pass over the per-request and per-path keys, told apart by their suffix (on a
    # Cluster, redis-py scans every master).
    async for key in store.scan_iter(match=keys.requests_pattern(), count=_SCAN_BATCH):
        if key.endswith(b":resp"):
            stored += 1
        elif key.endswith(b":fresh"):
            fresh += 1
        elif key.endswith(b":claim"):
            claims += 1
        elif b"}:dur:" in key:
            duration_keys.append(key)
    running = 0
    in_progress = in_progress_key_prefix + keys.job_ids_pattern()
    async for _ in queue.scan_iter(match=in_progress, count=_SCAN_BATCH):
        running += 1
    # Each path's durations are a hash of their own, in its slot (keys.durations).
    async with store.pipeline(transaction=False) as pipeline:
        pipeline.zcard(keys.paths())
        for key in duration_keys:
            pipeline.hgetall(key.decode())
        paths, *per_path = await pipeline.execute()
    durations = {path: ms for found in per_path for path, ms in found.items()}
    depth = await read_queue(queue, config.queue)
    typical = sorted(
        ((_path(path), int(ms) / 1000) for path, ms in durations.items()),
        key=lambda item: item[1],
        reverse=True,
    )
    return Stats(
        stored=stored,
        fresh=fresh,
        claims=claims,
        queued=depth.queued,
        running=running,
        paths=int(paths),
        slowest=tuple(typical[:_SLOWEST]),
        worker_health=depth.worker_health,
        seconds=time.perf_counter() - began,
        oldest_queued=depth.oldest_queued,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class QueueCheck:
    """Whether a worker serves the queue and keeps up with it (`asgi-worker stats --check`)."""

    queue: str
    """The queue's name."""
    worker_health: str | None
    """The last health report a worker on this queue wrote (arq's), if one is current."""
    queued: int
    """Jobs in the queue, the running ones included."""
    oldest_queued: float | None
    """As `Stats.oldest_queued`."""
    max_age: float
    """How far past its due time the oldest job may be before the queue is behind."""

    @property
    def problem(self) -> str | None:
        """What is wrong, in one line; None if a worker reports and the queue moves."""
        if self.worker_health is None:
            return (
                f"no worker serves queue {self.queue!r}: no health report in its key "
                f"{self.queue + health_check_key_suffix!r} (a worker writes one a minute)"
            )
        if self.oldest_queued is not None and self.oldest_queued > self.max_age:
            return (
                f"queue {self.queue!r} is behind: its oldest job is {self.oldest_queued:.0f} s "
                f"past due (more than --max-age {self.max_age:g} s; {self.queued:,} queued)"
            )
        return None

    def line(self) -> str:
        """One line for the probe's log: `ok: ...` or `unhealthy: ...`."""
        problem = self.problem
        if problem is not None:
            return f"unhealthy: {problem}"
        oldest = "empty" if self.oldest_queued is None else f"oldest {self.oldest_queued:.0f} s"
        return f"ok: a worker serves queue {self.queue!r} ({self.queued:,} queued, {oldest})"

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON, with `ok` and `problem`."""
        return {**dataclasses.asdict(self), "ok": self.problem is None, "problem": self.problem}


async def check_queue(
    config: Config, queue: Redis, *, max_age: float = DEFAULT_MAX_AGE
) -> QueueCheck:
    """Whether a worker serves `config`'s queue and keeps up (`asgi-worker stats --check`).

    One round trip, no keyspace walk: cheap enough for a liveness probe.

    Args:
        config: The app's `Config`.
        queue: A client on the queue's Redis (returning bytes).
        max_age: Seconds the oldest queued job may be past its due time.

    Returns:
        The check; its `problem` is None when all is well.
    """
    depth = await read_queue(queue, config.queue)
    return QueueCheck(
        queue=config.queue,
        worker_health=depth.worker_health,
        queued=depth.queued,
        oldest_queued=depth.oldest_queued,
        max_age=max_age,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class QueueDepth:
    """What one read of a queue finds: its jobs, the oldest one's lateness, the worker."""

    queued: int
    """Jobs in the queue (due or not, running or not)."""
    oldest_queued: float | None
    """Seconds since the earliest-due job was due (see `seconds_past_due`); None if empty."""
    worker_health: str | None
    """The latest worker's health report (arq's health-check key), None if none is current."""


async def read_queue(queue: Any, queue_name: str) -> QueueDepth:
    """Read `queue_name`'s depth, its oldest job and its worker's report in one round trip.

    `queue` is a client on the queue's Redis (returning bytes). The one read behind
    `collect_stats`, `check_queue` and the metrics' queue gauges.
    """
    async with queue.pipeline(transaction=False) as pipeline:
        pipeline.zcard(queue_name)
        pipeline.get(queue_name + health_check_key_suffix)
        pipeline.zrange(queue_name, 0, 0, withscores=True)
        queued, health, first = await pipeline.execute()
    return QueueDepth(
        queued=int(queued),
        oldest_queued=seconds_past_due(first),
        worker_health=health.decode("utf-8", "replace") if health is not None else None,
    )


def seconds_past_due(first: list[tuple[bytes, float]]) -> float | None:
    """Seconds since the earliest-due job (arq scores jobs by due time, in ms) was due.

    `first` is the queue's first member with its score. A job being run is scored at the
    end of its lease (`queue_scripts.TAKE`): only a job waiting for a worker, or whose
    worker died, makes this grow.
    """
    if not first:
        return None
    return max(0.0, time.time() - float(first[0][1]) / 1000)


def _path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")
