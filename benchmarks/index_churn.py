"""Invalidation indexes: their size under churn, and invalidating 100,000 entries.

`python -m benchmarks.index_churn` (`--help` for the knobs; about 30 s). Needs a Redis
(default `redis://127.0.0.1:6379/0`); every key goes under fresh prefixes
(`awbench-<random>-old`, `-new`), and only those keys are deleted at the end. Prints three
markdown tables.

Both layouts run in the same process, against the same Redis, interleaved:

- new: the scripts and `RedisStore` as they are (sorted-set indexes that forget expired
  members as they are written; invalidation in budgeted steps);
- old: the Lua scripts of `--baseline` (default `b844f15`, the last revision before
  bounded indexes), read with `git show`, sent the same lookup and commit arguments
  (their format is unchanged), and its one-call invalidation script. Without git or that
  revision, only the new layout runs.

Churn: `--rate` entries a second, each living `--ttl` seconds (fresh, no stale window),
for `--periods` lifetimes, sampled at the end of each lifetime; each entry is claimed
(lookup) then committed, as a job does. Twice: all entries of one path with one tag (the
path's and the tag's index), then each entry on a path of its own (the path list).
Size: `--entries` entries of one path and one tag (pipelined commits), then a soft
invalidation of the tag and a hard one of the path, each script call timed from Python.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from asgi_worker.backends.redis import scripts
from asgi_worker.backends.redis.store import RedisStore, Write
from asgi_worker.core.invalidation_targets import ByPath, ByTag
from asgi_worker.core.keys import RedisKeys

ROOT = Path(__file__).resolve().parent.parent
PATH = "/reports"
TAG = "report-list"
CLAIM_MS = 60_000
CHUNK = 2_000  # commits per pipeline


class TimedRedis(Redis):
    """Records the duration (ms, round trip included) of every EVALSHA."""

    durations: list[float]

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        call: Any = super().evalsha(sha, numkeys, *keys_and_args)
        return self._timed(call)

    async def _timed(self, call: Any) -> Any:
        began = time.perf_counter()
        try:
            return await call
        finally:
            self.durations.append((time.perf_counter() - began) * 1000)


def digest(n: int) -> str:
    return f"{n:032x}"


def one_path(n: int) -> str:
    return PATH


def own_path(n: int) -> str:
    return f"/items/{n}"


def write(n: int, keep: float, path: str) -> Write:
    return Write(b"x" * 200, fresh=keep, keep=keep, path=path, query=b"n=%d" % n, tags=(TAG,))


@dataclass
class Layout:
    """One key layout under its own prefix: how to claim, commit, measure and invalidate."""

    name: str
    redis: TimedRedis
    prefix: str
    old: dict[str, str] | None = None  # the baseline's scripts, or None for the new code
    store: RedisStore = field(init=False)
    shas: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = RedisStore(self.redis, prefix=self.prefix, claim_ttl=CLAIM_MS / 1000)

    async def load(self) -> None:
        texts = self.old or {"LOOKUP": scripts.LOOKUP, "COMMIT": scripts.COMMIT}
        for name in ("LOOKUP", "COMMIT", "INVALIDATE_INDEX"):
            if name in texts:
                self.shas[name] = await self.redis.script_load(texts[name])

    def lookup_command(self, n: int, path: str) -> tuple[Any, ...]:
        keys = RedisKeys(self.prefix)
        d = digest(n)
        request_keys = (keys.response(d), keys.fresh(d), keys.claim(d))
        return ("EVALSHA", self.shas["LOOKUP"], 3, *request_keys, "t", CLAIM_MS, path, self.prefix)

    def commit_command(self, n: int, started: int, write: Write) -> tuple[Any, ...]:
        command = self.store.commit_command(digest(n), "t", started, write)
        return (command[0], self.shas["COMMIT"], *command[2:])  # this layout's script

    def index_keys(self) -> tuple[str, str]:
        """The path's index and the tag's."""
        if self.old is None:
            keys = RedisKeys(self.prefix)
            return keys.path_index(PATH), keys.tag(TAG)
        sha1 = hashlib.sha1
        return (
            f"{self.prefix}:path:{sha1(PATH.encode()).hexdigest()}",
            f"{self.prefix}:tag:{sha1(TAG.encode()).hexdigest()}",
        )

    async def size(self, key: str) -> int:
        kind = (await self.redis.type(key)).decode()
        card = {"zset": "ZCARD", "hash": "HLEN", "set": "SCARD"}.get(kind)
        client: Any = self.redis
        return 0 if card is None else int(await client.execute_command(card, key))

    async def live(self, numbers: range) -> int:
        """How many of the entries `numbers` are still stored."""
        keys = RedisKeys(self.prefix)
        found = 0
        for start in range(numbers.start, numbers.stop, 5_000):
            chunk = range(start, min(start + 5_000, numbers.stop))
            found += int(await self.redis.exists(*(keys.response(digest(n)) for n in chunk)))
        return found

    async def invalidate(self, tag: bool, soft: bool) -> int:
        if self.old is None:
            return await self.store.invalidate(ByTag(TAG) if tag else ByPath(PATH), soft=soft)
        keys = RedisKeys(self.prefix)
        count = await self.redis.evalsha(
            self.shas["INVALIDATE_INDEX"],
            3,
            self.index_keys()[1 if tag else 0],
            keys.tag_stamp(TAG) if tag else keys.path_stamp(PATH),
            keys.paths(),
            self.prefix,
            "1" if soft else "0",
            CLAIM_MS + 60_000,
            "" if tag else PATH,
        )
        return int(count)


def baseline_scripts(revision: str) -> dict[str, str] | None:
    """The baseline's `scripts.py` constants, or None if git cannot show them."""
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:asgi_worker/backends/redis/scripts.py"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    namespace: dict[str, Any] = {}
    exec(compile(source, f"{revision}:asgi_worker/backends/redis/scripts.py", "exec"), namespace)
    return {name: value for name, value in namespace.items() if isinstance(value, str)}


async def store(
    layouts: list[Layout], numbers: range, keep: float, path: Callable[[int], str], claim: bool
) -> list[float]:
    """Store entries `numbers` in every layout, pipelined, alternating which goes first.

    With `claim`, each is looked up (claimed) first, as a job's is. Returns the seconds
    each layout took."""
    took = [0.0] * len(layouts)
    for start in range(numbers.start, numbers.stop, CHUNK):
        chunk = range(start, min(start + CHUNK, numbers.stop))
        order = list(enumerate(layouts))
        if start // CHUNK % 2:
            order.reverse()
        for i, layout in order:
            began = time.perf_counter()
            started = [0] * len(chunk)
            if claim:
                async with layout.redis.pipeline(transaction=False) as pipe:
                    for n in chunk:
                        pipe.execute_command(*layout.lookup_command(n, path(n)))
                    started = [int(reply[2]) for reply in await pipe.execute()]
            async with layout.redis.pipeline(transaction=False) as pipe:
                for n, at in zip(chunk, started, strict=True):
                    pipe.execute_command(*layout.commit_command(n, at, write(n, keep, path(n))))
                replies = await pipe.execute()
            took[i] += time.perf_counter() - began
            assert set(replies) == {b"stored"}, set(replies)
    return took


async def churn(
    layouts: list[Layout], args: argparse.Namespace, first: int, path: Callable[[int], str]
) -> list[list[str]]:
    """Store `args.rate` entries a second for `args.periods` lifetimes; a row per lifetime.

    Per layout: the live entries, then the path's and the tag's index (all entries on one
    path), or the path list (a path per entry)."""
    rows = []
    tick = 0.02
    per_tick = max(1, round(args.rate * tick))
    began = time.perf_counter()
    n = first
    for period in range(1, args.periods + 1):
        while time.perf_counter() - began < period * args.ttl:
            await store(layouts, range(n, n + per_tick), args.ttl, path, claim=True)
            n += per_tick
            due = began + (n - first) / per_tick * tick
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        recent = range(max(first, n - round(2 * args.rate * args.ttl)), n)
        row = [f"{period * args.ttl:g} s", f"{n - first:,}"]
        for layout in layouts:
            live = await layout.live(recent)
            keys = (
                [*layout.index_keys()] if path is one_path else [RedisKeys(layout.prefix).paths()]
            )
            row.append(f"{live:,}")
            for key in keys:
                size = await layout.size(key)
                row.append(f"{size:,} ({size / max(live, 1):.1f}x)")
        rows.append(row)
    return rows


async def size(layouts: list[Layout], entries: int) -> list[list[str]]:
    first = 10**7  # apart from the churn's entries
    took = await store(layouts, range(first, first + entries), 3_600, one_path, claim=False)
    rows = [
        [f"commit {entries:,} entries (pipelined), commits/s"]
        + [f"{entries / seconds:,.0f}" for seconds in took],
        ["path index: members / `MEMORY USAGE`"],
    ]
    for layout in layouts:
        key = layout.index_keys()[0]
        memory = int(await layout.redis.memory_usage(key, samples=0) or 0)
        rows[1].append(f"{await layout.size(key):,} / {memory / 1e6:.1f} MB")
    for what, tag, soft in (("soft, by tag", True, True), ("hard, by path", False, False)):
        results = []
        for layout in layouts:
            layout.redis.durations = []
            began = time.perf_counter()
            count = await layout.invalidate(tag, soft)
            total = (time.perf_counter() - began) * 1000
            results.append((count, total, list(layout.redis.durations)))
        rows.append([f"invalidate {what}: count"] + [f"{count:,}" for count, _, _ in results])
        rows.append(
            ["... total ms (script calls)"] + [f"{t:,.0f} ({len(d)})" for _, t, d in results]
        )
        rows.append(
            ["... median / longest script call, ms"]
            + [f"{statistics.median(d):.1f} / {max(d):.1f}" for _, _, d in results]
        )
    for layout in layouts:
        left = await layout.live(range(first, first + entries))
        assert left == 0, f"{layout.name}: {left} entries left"
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    run = f"awbench-{uuid.uuid4().hex[:8]}"
    client = TimedRedis.from_url(args.redis_url)
    client.durations = []
    old = baseline_scripts(args.baseline)
    layouts = [Layout("new", client, f"{run}-new")]
    if old is not None:
        layouts.insert(0, Layout(f"old ({args.baseline})", client, f"{run}-old", old))
    else:
        source = "asgi_worker/backends/redis/scripts.py"
        print(f"(no baseline: `git show {args.baseline}:{source}` failed)\n")
    try:
        for layout in layouts:
            await layout.load()
        title = f"{args.rate}/s entries living {args.ttl:g} s"
        header = ["after", "stored"]
        for layout in layouts:
            header += [f"{layout.name}: live", "path index", "tag index"]
        print(f"Churn, one path and one tag: {title}\n")
        print(table(header, await churn(layouts, args, 0, one_path)))
        header = ["after", "stored"]
        for layout in layouts:
            header += [f"{layout.name}: live", "path list"]
        print(f"\nChurn, a path per entry: {title}\n")
        print(table(header, await churn(layouts, args, 10**6, own_path)))
        print(f"\n{args.entries:,} entries of one path and one tag\n")
        print(table([""] + [layout.name for layout in layouts], await size(layouts, args.entries)))
    finally:
        for layout in layouts:
            async for key in client.scan_iter(match=f"{layout.prefix}*", count=1000):
                await client.delete(key)
        await client.aclose()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_churn")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rate", type=int, default=500, help="entries stored per second")
    parser.add_argument("--ttl", type=float, default=2.0, help="each entry's life, seconds")
    parser.add_argument("--periods", type=int, default=4, help="lifetimes each churn runs")
    parser.add_argument("--entries", type=int, default=100_000, help="entries to invalidate")
    parser.add_argument("--baseline", default="b844f15", help="git revision of the old code")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
