"""An optional in-process near cache for hot keys (`Config.near_cache_ttl`).

A fresh hit read from Redis is kept here for a micro-TTL (say 100 ms), so a hot URL costs
one Redis round trip per process per micro-TTL instead of one per request. Bounded by
bytes (least recently used out first). Never older than the micro-TTL: entries expire by
time, and every commit and invalidation announced on the notification channel evicts at
once (see events.EventListener), so an invalidation is seen within one message delay.

The bound is the process's memory, not the bodies': each entry is charged every object it
keeps alive (the key, the bookkeeping tuple, the response, its headers and body, see
`response_cost`), each rounded up as CPython's allocators round it, plus the table that
holds the entries (`sys.getsizeof` of the `OrderedDict`: its hash table, order links and
node array). `python -m benchmarks.near_memory` measures the result with tracemalloc and
the resident set size. Expired entries are swept from the least recently used end by
every put and every miss, a few at a time, so memory falls back once keys stop being hot
instead of waiting for each key to be read again.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Generic, TypeVar

from asgi_worker.core.codec import Coded, StoredResponse

Value = TypeVar("Value")

_SMALL_OBJECT = 512
"""pymalloc serves requests up to this size from pools, in 16-byte size classes."""
_SMALLEST_CACHED_INT, _LARGEST_CACHED_INT = -5, 256
"""CPython shares the ints in this range: a status of 200 costs an entry nothing."""
_SWEEP_PER_CALL = 32
"""Expired entries dropped at most per put or miss: bounded work, faster than puts add."""


def allocated(size: int) -> int:
    """Bytes an object of `size` bytes (`sys.getsizeof`) really takes on CPython.

    Up to 512 bytes pymalloc rounds to a multiple of 16; above that the system allocator
    (glibc's malloc) adds an 8-byte chunk header and rounds to 16. tracemalloc reports the
    requested sizes, so it shows a little less than this; the resident set size shows it.
    """
    if size <= _SMALL_OBJECT:
        return (size + 15) & ~15
    return (size + 8 + 15) & ~15


# Sizes of the fixed-size objects an entry holds, measured once with `sys.getsizeof`.
_FLOAT = allocated(sys.getsizeof(0.0))
_ITEM = allocated(sys.getsizeof((0.0, 0, None)))
"""The `(expires, cost, value)` tuple of every entry."""
_PAIR = allocated(sys.getsizeof((b"", b"")))
"""A `(name, value)` header tuple."""
_RESPONSE = allocated(sys.getsizeof(StoredResponse(status=0, headers=(), body=b"", stored_at=0)))
"""A `StoredResponse`: slots, so the same size whatever it holds."""
_CODED = allocated(sys.getsizeof(Coded("gzip", 0, by_cache=True)))
"""The `Coded` of a gzip body: slots, its coding a string msgpack decodes anew."""
_CODING = allocated(sys.getsizeof("gzip"))
_BYTES = sys.getsizeof(b"")
"""A bytes object but its content: header and trailing NUL (33 on 64-bit CPython)."""


def response_cost(response: StoredResponse) -> int:
    """Bytes a decoded `StoredResponse` keeps alive, all its parts its own.

    The dataclass, its `stored_at` float and its status (unless a shared small int), the
    headers tuple, each `(name, value)` pair tuple and its two bytes objects, the body,
    and for a gzip body its `Coded`.
    What `codec.decode_response` returns shares none of these with anything else, but
    for the objects CPython shares anyway (small ints, empty and one-byte bytes).
    """
    headers = response.headers
    cost = _RESPONSE + _FLOAT + _int_cost(response.status) + allocated(sys.getsizeof(headers))
    cost += _PAIR * len(headers)
    for name, value in headers:
        cost += bytes_cost(name) + bytes_cost(value)
    if (coded := response.coded) is not None:
        cost += _CODED + _CODING + _int_cost(coded.identity_length)
    return cost + bytes_cost(response.body)


class NearCache(Generic[Value]):
    """digest -> value, for `ttl` seconds, at most `max_bytes` of process memory in all.

    `cost(value)` tells the bytes a value keeps alive (`response_cost` for the
    `StoredResponse`s the middleware keeps); without it every `put` says the size itself.
    The cache adds what it spends per entry (the key string, the `(expires, cost, value)`
    tuple and its float and int) and the table holding the entries.
    """

    def __init__(
        self,
        *,
        ttl: float,
        max_bytes: int,
        cost: Callable[[Value], int] | None = None,
    ) -> None:
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._cost = cost
        self._entries: OrderedDict[str, tuple[float, int, Value]] = OrderedDict()
        self._bytes = 0  # the entries' costs; the table is measured when needed

    def get(self, digest: str) -> Value | None:
        """The value if present and younger than the ttl."""
        item = self._entries.get(digest)
        if item is None:
            self._sweep(monotonic())
            return None
        now = monotonic()
        if item[0] <= now:
            self.evict(digest)
            self._sweep(now)
            return None
        self._entries.move_to_end(digest)
        return item[2]

    def put(self, digest: str, value: Value, size: int | None = None) -> None:
        """Keep `value` for the ttl, evicting the least recently used if full.

        `size` is the bytes the value keeps alive, for a cache built without `cost`; a cache
        built with `cost` measures the value itself and ignores `size`.
        """
        if self._cost is not None:
            size = self._cost(value)
        elif size is None:
            raise TypeError("put() needs the size of the value when the cache has no cost")
        now = monotonic()
        self.evict(digest)
        self._sweep(now)
        expires = now + self._ttl
        cost = size + _entry_cost(digest)
        cost += _int_cost(cost)  # the int holding the cost, in the tuple
        if cost > self._max_bytes:
            return
        self._entries[digest] = (expires, cost, value)
        self._bytes += cost
        while self._entries and self.nbytes > self._max_bytes:
            _, (_, evicted, _) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def evict(self, digest: str) -> None:
        """Forget one key (it was stored anew or invalidated)."""
        item = self._entries.pop(digest, None)
        if item is not None:
            self._bytes -= item[1]
            if not self._entries:
                self.clear()

    def clear(self) -> None:
        """Forget everything (an invalidation whose keys we do not know one by one)."""
        self._entries.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now: every entry's cost plus the table holding the entries."""
        return self._bytes + allocated(sys.getsizeof(self._entries))

    def _sweep(self, now: float) -> None:
        """Drop expired entries from the least recently used end, at most a few per call.

        Every entry has the same ttl, so the entries ahead of an expired one (used before
        it was last used, hence stored before then) have all expired one ttl after it: an
        expired entry stays at most one ttl, then goes with the next puts or misses (each
        drops up to `_SWEEP_PER_CALL`, far more than the one entry a put adds).
        """
        entries = self._entries
        for _ in range(_SWEEP_PER_CALL):
            if not entries:
                self.clear()  # a dict keeps its table when emptied one key at a time
                return
            digest, (expires, cost, _) = next(iter(entries.items()))
            if expires > now:
                return
            del entries[digest]
            self._bytes -= cost

    def __len__(self) -> int:
        return len(self._entries)


def _entry_cost(digest: str) -> int:
    """What the cache spends on one entry beyond its value, but for the int of its cost.

    The key (kept alive by the table), the `(expires, cost, value)` tuple, its float.
    """
    return allocated(sys.getsizeof(digest)) + _ITEM + _FLOAT


def _int_cost(value: int) -> int:
    """Bytes of an int object: none for the small ints CPython shares."""
    if _SMALLEST_CACHED_INT <= value <= _LARGEST_CACHED_INT:
        return 0
    return allocated(sys.getsizeof(value))


def bytes_cost(value: bytes) -> int:
    """Bytes of a bytes object: none for the empty and one-byte ones CPython shares."""
    size = len(value)
    return allocated(_BYTES + size) if size > 1 else 0
