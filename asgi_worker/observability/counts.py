"""`MinuteCounts`: hits, misses and lookup latency in per-minute buckets, the last hour.

Counted in the process, a few integer additions per request (`Config.dashboard_counts`).
On Redis the buckets are also added, about once a second, to one hash per minute on the
queue's Redis (`write_minutes`), where the dashboard of any process reads every web
process's counts (`read_minutes`); with `memory://` the process's own buckets are read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asgi_worker.core.keys import RedisKeys

MINUTES_KEPT = 60
"""Minutes of counts kept (in the process, and on Redis by expiry)."""

_KEEP_SECONDS = (MINUTES_KEPT + 2) * 60  # a hash outlives its hour by a little


@dataclass(slots=True)
class Bucket:
    """One minute's counts."""

    minute: int
    """Unix seconds // 60."""
    hits: int = 0
    """Requests served from the cache (fresh or stale)."""
    misses: int = 0
    """Requests answered without a stored response (a 202, or held for `Prefer: wait`)."""
    lookups: int = 0
    """Redis lookups timed."""
    lookup_seconds: float = 0.0
    """Their total time."""

    def add(self, other: Bucket) -> None:
        """Add `other`'s counts to this bucket's."""
        self.hits += other.hits
        self.misses += other.misses
        self.lookups += other.lookups
        self.lookup_seconds += other.lookup_seconds

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, with the mean lookup latency in milliseconds."""
        mean = self.lookup_seconds / self.lookups * 1000 if self.lookups else None
        return {
            "minute": self.minute,
            "hits": self.hits,
            "misses": self.misses,
            "lookups": self.lookups,
            "lookup_ms": mean,
        }


class MinuteCounts:
    """The process's counts, one `Bucket` a minute, at most `MINUTES_KEPT` of them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[int, Bucket] = {}
        self.current = Bucket(-1)
        """The bucket of the minute counted last (see `bucket`)."""
        self._current_ends = 0.0  # when `current`'s minute ends, on `clock`
        self.now = 0.0
        """The clock's time at the last `bucket`."""

    def bucket(self) -> Bucket:
        """The bucket of this minute: one clock read and a comparison, mostly (hit path)."""
        now = self.now = self._clock()
        if now < self._current_ends:
            return self.current
        return self._roll(int(now) // 60)

    def _roll(self, minute: int) -> Bucket:
        self.current = self._buckets.setdefault(minute, Bucket(minute))
        self._current_ends = (minute + 1) * 60.0
        oldest = minute - MINUTES_KEPT
        if min(self._buckets) <= oldest:
            self._buckets = {m: b for m, b in self._buckets.items() if m > oldest}
        return self.current

    def take(self) -> list[Bucket]:
        """The buckets counted since the last `take`, and start afresh (for a write)."""
        taken = list(self._buckets.values())
        self._buckets = {}
        self.current = Bucket(-1)
        self._current_ends = 0.0
        return [bucket for bucket in taken if bucket.hits or bucket.misses or bucket.lookups]

    def take_would_write(self) -> bool:
        """Something is counted since the last `take`."""
        return any(b.hits or b.misses or b.lookups for b in self._buckets.values())

    def last_hour(self) -> list[Bucket]:
        """The kept buckets of the last `MINUTES_KEPT` minutes, oldest first."""
        since = int(self._clock()) // 60 - MINUTES_KEPT
        return sorted(
            (bucket for bucket in self._buckets.values() if bucket.minute > since),
            key=lambda bucket: bucket.minute,
        )


def write_minutes(pipeline: Any, keys: RedisKeys, buckets: list[Bucket]) -> None:
    """Queue on `pipeline` the additions of `buckets` to their minutes' hashes."""
    for bucket in buckets:
        key = keys.minute_counts(bucket.minute)
        # Whole microseconds: HINCRBY adds integers exactly, HINCRBYFLOAT would drift.
        added = {
            "hits": bucket.hits,
            "misses": bucket.misses,
            "lookups": bucket.lookups,
            "lookup_us": round(bucket.lookup_seconds * 1_000_000),
        }
        for name, value in added.items():
            if value:
                pipeline.hincrby(key, name, value)
        pipeline.expire(key, _KEEP_SECONDS)


async def read_minutes(redis: Any, keys: RedisKeys, now: float | None = None) -> list[Bucket]:
    """The minutes' hashes of the last hour on `redis` (one pipeline), oldest first."""
    last = int(time.time() if now is None else now) // 60
    minutes = range(last - MINUTES_KEPT + 1, last + 1)
    async with redis.pipeline(transaction=False) as pipeline:
        for minute in minutes:
            pipeline.hgetall(keys.minute_counts(minute))
        found = await pipeline.execute()
    buckets = []
    for minute, fields in zip(minutes, found, strict=True):
        if not fields:
            continue
        values = {key.decode(): _number(value) for key, value in fields.items()}
        buckets.append(
            Bucket(
                minute,
                values.get("hits", 0),
                values.get("misses", 0),
                values.get("lookups", 0),
                values.get("lookup_us", 0) / 1_000_000,
            )
        )
    return buckets


def _number(raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:  # not written by us: counted as nothing
        return 0
