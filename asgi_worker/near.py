"""An optional in-process near cache for hot keys (`Config.near_cache_ttl`).

A fresh hit read from Redis is kept here for a micro-TTL (say 100 ms), so a hot URL costs
one Redis round trip per process per micro-TTL instead of one per request. Bounded by
bytes (least recently used out first). Never older than the micro-TTL: entries expire by
time, and every commit and invalidation announced on the notification channel evicts at
once (see events.EventListener), so an invalidation is seen within one message delay.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

Value = TypeVar("Value")

_OVERHEAD = 256  # bytes charged per entry beyond its body: keys, tuples, headers


class NearCache(Generic[Value]):
    """digest -> value, for `ttl` seconds, at most `max_bytes` in all."""

    def __init__(self, *, ttl: float, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, int, Value]] = OrderedDict()
        self._bytes = 0

    def get(self, digest: str) -> Value | None:
        """The value if present and younger than the ttl."""
        item = self._entries.get(digest)
        if item is None:
            return None
        if item[0] <= time.monotonic():
            self.evict(digest)
            return None
        self._entries.move_to_end(digest)
        return item[2]

    def put(self, digest: str, value: Value, size: int) -> None:
        """Keep `value` (of about `size` bytes) for the ttl, evicting the oldest if full."""
        cost = size + _OVERHEAD
        if cost > self._max_bytes:
            return
        self.evict(digest)
        self._entries[digest] = (time.monotonic() + self._ttl, cost, value)
        self._bytes += cost
        while self._bytes > self._max_bytes:
            _, (_, evicted, _) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def evict(self, digest: str) -> None:
        """Forget one key (it was stored anew or invalidated)."""
        item = self._entries.pop(digest, None)
        if item is not None:
            self._bytes -= item[1]

    def clear(self) -> None:
        """Forget everything (an invalidation whose keys we do not know one by one)."""
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
