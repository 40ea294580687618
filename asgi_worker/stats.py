"""`collect_stats`: what the cache and its queue hold now, for `asgi-worker stats`.

Read-only. Counting entries and claims walks the keyspace with `SCAN` (in batches, so
Redis keeps serving meanwhile): on a large keyspace that takes a while, never a lock.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from arq.constants import health_check_key_suffix, in_progress_key_prefix
from redis.asyncio import Redis

from .config import Config
from .keys import RedisKeys

_SCAN_BATCH = 1000
_SLOWEST = 10


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

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON."""
        return dataclasses.asdict(self)


async def collect_stats(config: Config, store: Redis, queue: Redis) -> Stats:
    """Count what `config`'s cache holds in `store` and its jobs in `queue`.

    `store` and `queue` may be the same client (the usual case: one Redis). Both must
    return bytes, as `Redis.from_url(url)` does by default (not `decode_responses=True`).
    """
    began = time.perf_counter()
    keys = RedisKeys(config.prefix)
    stored = fresh = claims = 0
    # One pass over the per-request keys, told apart by their suffix.
    async for key in store.scan_iter(match=keys.requests_pattern(), count=_SCAN_BATCH):
        if key.endswith(b":resp"):
            stored += 1
        elif key.endswith(b":fresh"):
            fresh += 1
        elif key.endswith(b":claim"):
            claims += 1
    running = 0
    in_progress = in_progress_key_prefix + keys.job_ids_pattern()
    async for _ in queue.scan_iter(match=in_progress, count=_SCAN_BATCH):
        running += 1
    async with store.pipeline(transaction=False) as pipeline:
        pipeline.zcard(keys.paths())
        pipeline.hgetall(keys.durations())
        paths, durations = await pipeline.execute()
    async with queue.pipeline(transaction=False) as pipeline:
        pipeline.zcard(config.queue)
        pipeline.get(config.queue + health_check_key_suffix)
        queued, health = await pipeline.execute()
    typical = sorted(
        ((_path(path), int(ms) / 1000) for path, ms in durations.items()),
        key=lambda item: item[1],
        reverse=True,
    )
    return Stats(
        stored=stored,
        fresh=fresh,
        claims=claims,
        queued=int(queued),
        running=running,
        paths=int(paths),
        slowest=tuple(typical[:_SLOWEST]),
        worker_health=health.decode("utf-8", "replace") if health is not None else None,
        seconds=time.perf_counter() - began,
    )


def _path(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")
