"""Invalidation indexes stay bounded, and invalidating a huge one never holds Redis long.

Churn: entries of a short life are stored for several lifetimes; every index (a path's,
a tag's, the path list) must stay within twice the live entries it names. Size: 100,000
entries of one path are expired in script calls of a few milliseconds each, with the
right count. Both stores where the store API tells (the churn); Redis alone for the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from asgi_worker.backends.base import Committed, Store, Write
from asgi_worker.backends.memory import MemoryStore
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.invalidation_targets import ByGlob, ByPath, ByQuery, ByTag
from asgi_worker.core.keys import RedisKeys

from .conftest import REDIS_URL

LEASE = 0.3
LONG_LEASE = 30.0  # the churn's: far longer than an entry lives, as claim leases usually are
LIFE = 1.0  # seconds fresh, no stale window
PERIODS = 3.5  # how many lifetimes the churn runs
RATE = 400  # entries stored per second during the churn
SLACK = 32  # the constant on top of 2x (a few members forgotten per write, not all)


DIGEST = "0123456789abcdef0123456789abcdef"


def digest(n: int) -> str:
    return f"{n:032x}"


def write(path: str, query: bytes = b"", tags: tuple[str, ...] = (), keep: float = LIFE) -> Write:
    return Write(b"entry", fresh=keep, keep=keep, path=path, query=query, tags=tags)


class TimedRedis(Redis):
    """A client that records how long each EVALSHA takes, round trip included (ms)."""

    durations: list[float]
    after_call: Any = None  # an async callable run after each EVALSHA, if set

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        call: Any = super().evalsha(sha, numkeys, *keys_and_args)
        return self._timed(call)

    async def _timed(self, call: Awaitable[Any]) -> Any:
        began = time.perf_counter()
        try:
            return await call
        finally:
            self.durations.append((time.perf_counter() - began) * 1000)
            if self.after_call is not None:
                await self.after_call()


@pytest.fixture
async def timed(redis: Redis) -> AsyncIterator[TimedRedis]:
    # `redis` (conftest) deletes this test's keys afterwards.
    client = TimedRedis.from_url(REDIS_URL)
    client.durations = []
    yield client
    await client.aclose()


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis: Redis, prefix: str) -> AsyncIterator[Store]:
    if request.param == "redis":
        yield RedisStore(redis, prefix=prefix, claim_ttl=LONG_LEASE)
    else:
        yield MemoryStore(claim_ttl=LONG_LEASE)


async def store_one(store: Store, n: int, path: str, **changes: Any) -> None:
    claimed = await store.lookup(digest(n), "t", path)
    assert claimed.claimed_at is not None
    await store.list_path(path)  # as the job does before its app runs
    stored = await store.commit(digest(n), "t", claimed.claimed_at, write(path, **changes))
    assert stored is Committed.STORED


async def live(store: Store, redis: Redis, prefix: str, digests: Sequence[str]) -> int:
    """How many of `digests` still have an entry."""
    if isinstance(store, MemoryStore):
        now = time.monotonic()
        return sum(store._live(d, now) is not None for d in digests)
    keys = RedisKeys(prefix)
    return int(await redis.exists(*(keys.response(d) for d in digests))) if digests else 0


async def sizes(store: Store, redis: Redis, prefix: str, path: str, tag: str) -> tuple[int, ...]:
    """The sizes of the path's index, the tag's index, and the path list."""
    if isinstance(store, MemoryStore):
        paths, tags = store._paths.by_key, store._tags.by_key
        return (
            len(paths[path].members) if path in paths else 0,
            len(tags[tag].members) if tag in tags else 0,
            len(paths),
        )
    keys = RedisKeys(prefix)
    return tuple(
        [await members(redis, key) for key in (keys.path_index(path), keys.tag(tag), keys.paths())]
    )


async def members(redis: Redis, key: str) -> int:
    """The size of an index of any type (so that these tests also measure older layouts)."""
    client: Any = redis  # redis-py's stubs type some replies as "Awaitable or not"
    kind = (await client.type(key)).decode()
    card = {"zset": client.zcard, "hash": client.hlen, "set": client.scard}.get(kind)
    return 0 if card is None else int(await card(key))


async def churn(one: Callable[[int], Awaitable[None]], periods: float = PERIODS) -> int:
    """Store RATE entries a second (`one(n)` stores the n-th) for `periods` lifetimes.

    Returns how many were stored."""
    tick = 0.05
    per_tick = round(RATE * tick)
    began = time.perf_counter()
    n = 0
    while time.perf_counter() - began < periods * LIFE:
        await asyncio.gather(*(one(n + i) for i in range(per_tick)))
        n += per_tick
        await asyncio.sleep(max(0.0, began + (n / per_tick) * tick - time.perf_counter()))
    return n


async def test_one_paths_index_and_its_tag_stay_near_the_live_entries(
    store: Store, redis: Redis, prefix: str
) -> None:
    async def one(n: int) -> None:
        await store_one(store, n, "/churn", query=f"n={n}".encode(), tags=("churned",))

    stored = await churn(one)
    recent = [digest(n) for n in range(max(0, stored - 2 * RATE), stored)]
    index, tag, paths = await sizes(store, redis, prefix, "/churn", "churned")
    alive = await live(store, redis, prefix, recent)
    assert stored > 3 * RATE  # several lifetimes' worth: without pruning, index ~ stored
    assert 0 < alive < stored / 2
    assert index <= 2 * alive + SLACK, (index, alive, stored)
    assert tag <= 2 * alive + SLACK, (tag, alive, stored)
    assert paths == 1


async def test_the_path_list_stays_near_the_live_paths(
    store: Store, redis: Redis, prefix: str
) -> None:
    async def one(n: int) -> None:
        await store_one(store, n, f"/item/{n}", tags=(f"item-{n}",))

    stored = await churn(one)
    recent = [digest(n) for n in range(max(0, stored - 2 * RATE), stored)]
    *_, paths = await sizes(store, redis, prefix, "/item/0", "item-0")
    alive = await live(store, redis, prefix, recent)  # one entry per path
    assert 0 < alive < stored / 2
    assert paths <= 2 * alive + SLACK, (paths, alive, stored)
    if isinstance(store, MemoryStore):
        assert len(store._tags.by_key) <= 2 * alive + SLACK
    else:  # a tag index of one expired entry is a key that expires with it
        assert await redis.exists(RedisKeys(prefix).tag("item-0")) == 0


async def test_a_path_whose_job_runs_stays_listed_through_churn(
    store: Store, redis: Redis, prefix: str
) -> None:
    # A job claims a new path and runs long; meanwhile other paths come and go, each new
    # one forgetting ended paths. The running job's path must stay, so that a prefix
    # invalidation finds it and refuses the job's result.
    claimed = await store.lookup(digest(10**6), "slow", "/slow/report")
    assert claimed.claimed_at is not None
    await store.list_path("/slow/report")

    async def one(n: int) -> None:
        await store_one(store, n, f"/item/{n}")

    await churn(one, periods=2.5)
    assert await store.invalidate(ByGlob("/slow/*")) == 0
    refused = await store.commit(digest(10**6), "slow", claimed.claimed_at, write("/slow/report"))
    assert refused is Committed.REFUSED


async def test_a_claim_is_listed_until_its_job_ends_and_given_up_claims_do_not_pile_up(
    redis: Redis, prefix: str
) -> None:
    store = RedisStore(redis, prefix=prefix, claim_ttl=LONG_LEASE)
    keys = RedisKeys(prefix)
    index = keys.path_index("/claimed")
    for n in range(10):  # enqueueing failed: each lookup's claim is given up
        assert (await store.lookup(DIGEST, f"t{n}", "/claimed")).claimed
        await store.release(DIGEST, f"t{n}")
    assert await redis.zcard(index) == 1  # the claims of one request share a member
    started = (await store.lookup(DIGEST, "job", "/claimed")).claimed_at
    assert started is not None
    await store.list_path("/claimed")
    lease_end = await redis.zscore(keys.paths_by_expiry(), "/claimed")
    assert lease_end is not None
    stored = await store.commit(DIGEST, "job", started, write("/claimed", b"q=1"))
    assert stored is Committed.STORED
    # The job ended: its claim left the index, and the path lives as long as its entry.
    [(member, expiry)] = await redis.zrange(index, 0, -1, withscores=True)
    assert member == DIGEST.encode() + b"q=1"
    listed = await redis.zscore(keys.paths_by_expiry(), "/claimed")
    assert listed is not None
    assert abs(listed - expiry) < 1_000
    assert listed < lease_end


async def commit_many(
    redis: Redis, store: RedisStore, count: int, path: str, tag: str, keep: float = 600
) -> None:
    """Store `count` entries of `path` fast: claims set and commits pipelined.

    The tag is indexed directly (a commit command carries none): as `TAG_ADD` would."""
    keys = RedisKeys(store_prefix(store))
    await redis.set(keys.claim(digest(0)), "t")
    first = write(path, b"n=0", keep=keep)
    assert await store.commit(digest(0), "t", 0, first) is Committed.STORED  # loads the script
    chunk = 2_000
    for start in range(0, count, chunk):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(start + chunk, count)):
                if n:
                    pipe.set(keys.claim(digest(n)), "t")
                    entry = write(path, f"n={n}".encode(), keep=keep)
                    pipe.execute_command(*store.commit_command(digest(n), "t", 0, entry))
                pipe.zadd(keys.tag(tag), {digest(n): 1e15})
            assert set(await pipe.execute()) <= {b"stored", True, 0}


def store_prefix(store: RedisStore) -> str:
    return store._keys.prefix


async def claimed_commands(store: RedisStore, pipe: Any, n: int, entry: Write) -> None:
    """Queue on `pipe` a claim for digest(n), then its commit command."""
    pipe.set(RedisKeys(store_prefix(store)).claim(digest(n)), "t")
    pipe.execute_command(*store.commit_command(digest(n), "t", 0, entry))


async def count_existing(redis: Redis, keys: list[str]) -> int:
    found = 0
    for start in range(0, len(keys), 5_000):
        found += int(await redis.exists(*keys[start : start + 5_000]))
    return found


async def slow_calls(redis: Redis, prefix: str, since: float) -> list[int] | None:
    """Durations (µs) of this test's commands in SLOWLOG since `since`, or None if the
    slow log does not record every call over 10 ms (then it cannot tell)."""
    threshold = int((await redis.config_get("slowlog-log-slower-than"))["slowlog-log-slower-than"])
    if not 0 <= threshold <= 10_000:
        return None
    entries = await redis.slowlog_get(128)
    return [
        int(entry["duration"])
        for entry in entries
        if entry["start_time"] >= since and prefix.encode() in entry["command"]
    ]


def assert_short(durations: list[float]) -> None:
    """Every step short: median <= 10 ms, max <= 50 ms (slack for this shared machine)."""
    assert statistics.median(durations) <= 10, sorted(durations)[-10:]
    assert max(durations) <= 50, sorted(durations)[-10:]


async def test_invalidating_100_000_entries_never_holds_redis_long(
    timed: TimedRedis, redis: Redis, prefix: str
) -> None:
    store = RedisStore(timed, prefix=prefix, claim_ttl=LEASE)
    keys = RedisKeys(prefix)
    total = 100_000
    await commit_many(timed, store, total, "/huge", "huge")
    assert await members(redis, keys.path_index("/huge")) == total
    assert await members(redis, keys.tag("huge")) == total
    since = time.time() - 1

    timed.durations = []
    assert await store.invalidate(ByTag("huge"), soft=True) == total
    soft_steps = timed.durations
    assert len(soft_steps) >= 10  # it was done in steps
    assert_short(soft_steps)
    assert await count_existing(redis, [keys.fresh(digest(n)) for n in range(total)]) == 0
    assert await count_existing(redis, [keys.response(digest(n)) for n in range(total)]) == total

    timed.durations = []
    assert await store.invalidate(ByPath("/huge")) == total
    hard_steps = timed.durations
    assert len(hard_steps) >= 10
    assert_short(hard_steps)
    assert await count_existing(redis, [keys.response(digest(n)) for n in range(total)]) == 0
    assert await redis.exists(keys.path_index("/huge")) == 0
    assert await store.invalidate(ByPath("/huge")) == 0

    # The server's own account: no call of this test over 50 ms (SLOWLOG logs those over
    # 10 ms), and hardly any over 10 ms.
    slow = await slow_calls(redis, prefix, since)
    if slow is not None:
        assert all(duration <= 50_000 for duration in slow), slow
        assert len(slow) <= max(2, (len(soft_steps) + len(hard_steps)) // 50), slow


async def test_a_query_invalidation_of_a_large_index_pages_and_counts_each_entry_once(
    timed: TimedRedis, redis: Redis, prefix: str
) -> None:
    store = RedisStore(timed, prefix=prefix, claim_ttl=LEASE)
    keys = RedisKeys(prefix)
    total = 5_000
    first = write("/q", b"n=0&even=1", keep=600)
    await redis.set(keys.claim(digest(0)), "t")
    assert await store.commit(digest(0), "t", 0, first) is Committed.STORED
    async with timed.pipeline(transaction=False) as pipe:
        for n in range(1, total):
            entry = write("/q", f"n={n}&even={1 - n % 2}".encode(), keep=600)
            await claimed_commands(store, pipe, n, entry)
        await pipe.execute()
    # Two more members naming entry 1 (odd), both matching even=1: it counts once.
    odd = digest(1).encode()
    await redis.zadd(keys.path_index("/q"), {odd + b"even=1&a": 1e15, odd + b"even=1&b": 1e15})
    evens = ByQuery("/q", (("even", "1"),))
    timed.durations = []
    assert await store.invalidate(evens, soft=True) == total // 2 + 1
    assert len(timed.durations) > 2  # the stamp, then a call per page with matches
    assert_short(timed.durations)
    assert await store.invalidate(evens) == total // 2 + 1
    assert await store.invalidate(evens) == 0
    assert await store.invalidate(ByPath("/q")) == total // 2 - 1


async def test_a_prefix_invalidation_pages_through_many_paths(redis: Redis, prefix: str) -> None:
    store = RedisStore(redis, prefix=prefix, claim_ttl=LONG_LEASE)
    for n in range(1_200):  # each path claimed and listed, as its job would
        await store.lookup(digest(n), "t", f"/many/{n}")
        await store.list_path(f"/many/{n}")
    await store.lookup(digest(5_000), "t", "/other")
    await store.list_path("/other")
    await store.commit(digest(5_000), "t", 0, write("/other", keep=60))  # loads the script
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(1_200):
            entry = write(f"/many/{n}", keep=60)  # outlives the invalidation's many steps
            pipe.execute_command(*store.commit_command(digest(n), "t", 0, entry))
        assert set(await pipe.execute()) == {b"stored"}
    assert await store.invalidate(ByGlob("/many/*")) == 1_200
    assert await redis.exists(RedisKeys(prefix).response(digest(5_000))) == 1


async def test_during_a_stepped_invalidation_old_jobs_are_refused_and_new_ones_store(
    timed: TimedRedis, redis: Redis, prefix: str
) -> None:
    store = RedisStore(timed, prefix=prefix, claim_ttl=60)
    keys = RedisKeys(prefix)
    total = 20_000
    await commit_many(timed, store, total, "/busy", "busy")
    old = (await store.lookup(digest(total + 1), "old", "/busy")).claimed_at
    assert old is not None  # this job began before the stamp
    outcomes: list[Committed] = []

    async def between_steps() -> None:
        if outcomes:
            return
        timed.after_call = None  # once, after the first step: the stamp is written
        new = (await store.lookup(digest(total + 2), "new", "/busy")).claimed_at
        assert new is not None
        for n, started, token in ((total + 1, old, "old"), (total + 2, new, "new")):
            outcomes.append(await store.commit(digest(n), token, started, write("/busy", keep=60)))

    timed.after_call = between_steps
    count = await store.invalidate(ByPath("/busy"))
    assert outcomes == [Committed.REFUSED, Committed.STORED]
    # The new entry is legitimately new: the steps after it may have dropped it or not.
    assert count in (total, total + 1)
    survivors = await count_existing(redis, [keys.response(digest(n)) for n in range(total + 3)])
    assert survivors == total + 1 - count


async def test_keys_left_in_the_old_layout_break_nothing(redis: Redis, prefix: str) -> None:
    store = RedisStore(redis, prefix=prefix, claim_ttl=LEASE)
    # The former per-path hash and per-tag set, under their former names.
    client: Any = redis
    await client.hset(f"{prefix}:path:{hashlib.sha1(b'/old').hexdigest()}", "x" * 32, "q")
    await client.sadd(f"{prefix}:tag:{hashlib.sha1(b'old').hexdigest()}", "x" * 32)
    claimed = await store.lookup(digest(1), "t", "/old")
    assert claimed.claimed_at is not None
    await store.list_path("/old")
    tagged = write("/old", tags=("old",), keep=60)
    assert await store.commit(digest(1), "t", claimed.claimed_at, tagged) is Committed.STORED
    assert await store.invalidate(ByTag("old"), soft=True) == 1
    assert await store.invalidate(ByQuery("/old", (("a", "1"),))) == 0
    assert await store.invalidate(ByGlob("/ol*")) == 1
