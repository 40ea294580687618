"""The near cache's memory: configured `near_cache_bytes` against what the process holds.

    .venv/bin/python -m benchmarks.near_memory [--max-bytes N] [--sizes 10,1024,...]

For each body size, a near cache of `--max-bytes` (default 32 MiB, `Config`'s default) is
filled with twice as many entries as the old accounting let in, so least-recently-used
eviction runs in its steady state. Each entry is what the middleware keeps: a 32-hex-digit
digest and a `StoredResponse` decoded from msgpack (`codec.decode_response`, so every part
is its own object, as in the server) with three headers (`content-length`, `content-type`,
`cache-control`). Measured twice per cache, each time in a fresh interpreter:

- traced: tracemalloc's traced memory after the fill minus before the cache was built
  (the bytes Python asked its allocators for; no allocator rounding or fragmentation);
- RSS: `VmRSS` of /proc/self/status after minus before, without tracemalloc running (the
  process's real memory, allocator rounding and fragmentation included; Linux only).

"before" is a copy of the old accounting (256 B per entry plus the body); "after" is
`asgi_worker.web.near_cache.NearCache` with `response_cost`, as `open_backend` builds it. Ratios
are measured bytes over configured bytes: 1.00 is the bound kept exactly.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Generic, TypeVar

from asgi_worker.core.codec import StoredResponse, decode_response, encode_response
from asgi_worker.web.near_cache import NearCache, response_cost

Value = TypeVar("Value")

MIB = 1024 * 1024
SIZES = (0, 10, 100, 1024, 10 * 1024, 100 * 1024)
OLD_OVERHEAD = 256


class OldNearCache(Generic[Value]):
    """The accounting before the fix: 256 B per entry plus the body (its `put`, copied)."""

    def __init__(self, *, ttl: float, max_bytes: int) -> None:
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[float, int, Value]] = OrderedDict()
        self._bytes = 0

    def put(self, digest: str, value: Value, size: int) -> None:
        cost = size + OLD_OVERHEAD
        if cost > self._max_bytes:
            return
        self.evict(digest)
        self._entries[digest] = (time.monotonic() + self._ttl, cost, value)
        self._bytes += cost
        while self._bytes > self._max_bytes:
            _, (_, evicted, _) = self._entries.popitem(last=False)
            self._bytes -= evicted

    def evict(self, digest: str) -> None:
        item = self._entries.pop(digest, None)
        if item is not None:
            self._bytes -= item[1]

    def __len__(self) -> int:
        return len(self._entries)


def response(number: int, body_size: int) -> StoredResponse:
    """A response as `decode_response` hands it to the middleware: all parts its own."""
    body = (b"%019d" % number * (body_size // 19 + 1))[:body_size]
    headers = (
        (b"content-length", str(body_size).encode()),
        (b"content-type", b"application/json"),
        (b"cache-control", b"public, max-age=60"),
    )
    stored = StoredResponse(status=200, headers=headers, body=body, stored_at=time.time())
    return decode_response(encode_response(stored))


def digest(number: int) -> str:
    """A digest shaped like `RequestSnapshot.digest` (blake2b, 16 bytes, hex)."""
    return f"{number:032x}"


def rss() -> int:
    """The resident set size of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(accounting: str, body_size: int, max_bytes: int, how: str) -> dict[str, int]:
    """Fill one cache and return the bytes it holds (`how`: traced or rss), in this process."""
    puts = 2 * max_bytes // (body_size + OLD_OVERHEAD) + 100
    if how == "traced":
        tracemalloc.start()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0] if how == "traced" else rss()
    near: OldNearCache[StoredResponse] | NearCache[StoredResponse]
    if accounting == "old":
        near = OldNearCache(ttl=3600, max_bytes=max_bytes)
    else:
        near = NearCache(ttl=3600, max_bytes=max_bytes, cost=response_cost)
    for number in range(puts):
        value = response(number, body_size)
        near.put(digest(number), value, len(value.body))
    del value
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if how == "traced" else rss()
    return {"entries": len(near), "bytes": after - before}


def run_child(accounting: str, body_size: int, max_bytes: int, how: str) -> dict[str, int]:
    """`measure` in a fresh interpreter, so no fill leaves memory behind for the next."""
    args = [sys.executable, "-m", "benchmarks.near_memory", "--child"]
    args += [accounting, str(body_size), str(max_bytes), how]
    output = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    result: dict[str, int] = json.loads(output)
    return result


def size_label(size: int) -> str:
    """10 B, 1 KiB, 100 KiB."""
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=32 * MIB, help="near_cache_bytes")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="body sizes in bytes, comma-separated"
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        accounting, body_size, max_bytes, how = options.child
        print(json.dumps(measure(accounting, int(body_size), int(max_bytes), how)))
        return
    max_bytes = options.max_bytes
    sizes = [int(size) for size in options.sizes.split(",")]
    runs = [
        (accounting, size, how)
        for size in sizes
        for accounting in ("old", "new")
        for how in ("traced", "rss")
    ]
    # One interpreter per measurement, several at once: each has a resident set of its own.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        measured = pool.map(lambda run: run_child(run[0], run[1], max_bytes, run[2]), runs)
        results = dict(zip(runs, measured, strict=True))
    print(f"near_cache_bytes = {max_bytes / MIB:g} MiB; measured / configured:\n")
    print("| body | before: entries | before: traced | before: RSS |", end="")
    print(" after: entries | after: traced | after: RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in sizes:
        cells = [size_label(size)]
        for accounting in ("old", "new"):
            traced, resident = results[accounting, size, "traced"], results[accounting, size, "rss"]
            cells.append(f"{traced['entries']:,}")
            cells.append(f"{traced['bytes'] / max_bytes:.2f}")
            cells.append(f"{resident['bytes'] / max_bytes:.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
