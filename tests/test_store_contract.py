"""The `Store` contract, on `RedisStore` and `MemoryStore` alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_worker.backends.base import Body, Committed, Lookup, Store, Write
from asgi_worker.backends.memory import MemoryStore
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.invalidation_targets import ByGlob, ByPath, ByQuery, ByTag, Target
from asgi_worker.core.keys import RedisKeys

LEASE = 0.3
DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis: Redis, prefix: str) -> AsyncIterator[Store]:
    if request.param == "redis":
        yield RedisStore(redis, prefix=prefix, claim_ttl=LEASE)
    else:
        yield MemoryStore(claim_ttl=LEASE)


def write(entry: bytes = b"entry", **changes: object) -> Write:
    values: dict[str, object] = {
        "fresh": 5.0,
        "keep": 5.0,
        "path": "/report",
        "query": b"year=2026",
    }
    values.update(changes)
    return Write(entry, **values)  # type: ignore[arg-type]


async def claim(
    store: Store, digest: str = DIGEST, token: str = "job", path: str = "/report"
) -> float:
    """Claim `digest` for `token` and list its path, as a job does before its app runs.

    Returns the claim time, the job's start for `commit`."""
    claimed_at = (await store.lookup(digest, token, path)).claimed_at
    assert claimed_at is not None
    await store.list_path(path)
    return claimed_at


async def store_one(
    store: Store, digest: str = DIGEST, token: str = "t", entry: bytes = b"entry", **changes: object
) -> None:
    started = await claim(store, digest, token, str(changes.get("path", "/report")))
    assert await store.commit(digest, token, started, write(entry, **changes)) is Committed.STORED


async def test_first_lookup_claims_others_wait(store: Store) -> None:
    first = await store.lookup(DIGEST, "a", "/report")
    assert first == Lookup(None, stale=False, claimed=True)
    assert first.claimed_at is not None
    second = await store.lookup(DIGEST, "b", "/report")
    assert second == Lookup(None, stale=False, claimed=False)
    assert second.claimed_at is None


async def test_lease_left_counts_down_from_the_claim_and_begin_renews_it(store: Store) -> None:
    claimed_at = await claim(store)
    assert LEASE - 0.1 < store.lease_left(claimed_at) <= LEASE + 0.05
    await asyncio.sleep(0.2)
    assert store.lease_left(claimed_at) < LEASE - 0.15
    renewed = await store.begin(DIGEST, "job", "/report")
    assert renewed is not None
    assert renewed > claimed_at
    assert LEASE - 0.1 < store.lease_left(renewed) <= LEASE + 0.05
    await asyncio.sleep(0.2)  # past the first lease, within the renewed one
    assert not (await store.lookup(DIGEST, "other", "/report")).claimed


async def test_lease_runs_out_and_the_next_request_claims_again(store: Store) -> None:
    assert (await store.lookup(DIGEST, "dead-worker", "/report")).claimed
    await asyncio.sleep(LEASE + 0.1)
    assert (await store.lookup(DIGEST, "next", "/report")).claimed


async def test_commit_stores_and_releases_its_own_claim(store: Store) -> None:
    await store_one(store)
    assert await store.lookup(DIGEST, "b", "/report") == Lookup(b"entry")
    await store.discard(DIGEST)
    assert (await store.lookup(DIGEST, "c", "/report")).claimed


async def test_a_stale_token_does_not_release_a_newer_claim(store: Store) -> None:
    await store.lookup(DIGEST, "old", "/report")
    await asyncio.sleep(LEASE + 0.1)
    await store.lookup(DIGEST, "new", "/report")
    await store.release(DIGEST, "old")
    assert not (await store.lookup(DIGEST, "third", "/report")).claimed


async def test_a_superseded_job_neither_begins_nor_commits(store: Store) -> None:
    started = await claim(store, token="old")
    await asyncio.sleep(LEASE + 0.1)
    assert (await store.lookup(DIGEST, "new", "/report")).claimed
    assert await store.begin(DIGEST, "old", "/report") is None
    assert await store.commit(DIGEST, "old", started, write(b"late")) is Committed.REFUSED
    assert (await store.lookup(DIGEST, "x", "/report")).entry is None


async def test_entries_go_stale_then_expire(store: Store) -> None:
    await store_one(store, fresh=0.2, keep=0.5)
    assert await store.lookup(DIGEST, "a", "/report") == Lookup(b"entry")
    await asyncio.sleep(0.3)
    # Stale: served, and exactly one lookup claims the refresh.
    assert await store.lookup(DIGEST, "b", "/report") == Lookup(b"entry", stale=True, claimed=True)
    assert await store.lookup(DIGEST, "c", "/report") == Lookup(b"entry", stale=True, claimed=False)
    await asyncio.sleep(0.3)
    assert (await store.lookup(DIGEST, "d", "/report")).entry is None


async def test_a_failed_refresh_keeps_the_stale_copy_and_backs_off(store: Store) -> None:
    await store_one(store, fresh=0.1, keep=5.0)
    await asyncio.sleep(0.15)
    started = await claim(store, token="refresh")
    failed = write(b"error", failed=True, retry_after=0.3)
    assert await store.commit(DIGEST, "refresh", started, failed) is Committed.KEPT_STALE
    backing_off = await store.lookup(DIGEST, "a", "/report")
    assert backing_off == Lookup(b"entry", stale=True, claimed=False)
    assert backing_off.holder is None  # a marker, no job's claim: never taken for lost
    # The same commit sent again (its reply was lost) says the same.
    assert await store.commit(DIGEST, "refresh", started, failed) is Committed.KEPT_STALE
    await asyncio.sleep(0.35)
    assert (await store.lookup(DIGEST, "b", "/report")).claimed  # back-off over: try again


async def test_a_lookup_that_finds_another_s_claim_names_its_holder_and_age(
    store: Store,
) -> None:
    assert (await store.lookup(DIGEST, "first", "/report")).claimed
    await asyncio.sleep(0.1)
    found = await store.lookup(DIGEST, "second", "/report")
    assert (found.claimed, found.holder) == (False, "first")
    assert 0.08 < found.held_for < 0.2
    # A fresh hit names nobody.
    await store_one(store, digest=DIGEST[::-1], token="t")
    assert (await store.lookup(DIGEST[::-1], "x", "/report")).holder is None


async def test_a_claim_kept_to_back_off_holds_until_its_lease_ends_naming_no_job(
    store: Store,
) -> None:
    await store.lookup(DIGEST, "failed", "/report")
    await store.back_off(DIGEST, "someone-else")  # not its claim: nothing changes
    assert (await store.lookup(DIGEST, "a", "/report")).holder == "failed"
    await store.back_off(DIGEST, "failed")
    backing_off = await store.lookup(DIGEST, "b", "/report")
    assert (backing_off.claimed, backing_off.holder) == (False, None)
    assert await store.take_over(DIGEST, "failed", "c", "/report") is None
    await asyncio.sleep(LEASE + 0.05)
    assert (await store.lookup(DIGEST, "d", "/report")).claimed


async def test_a_claim_is_taken_over_only_from_its_holder_and_only_once(store: Store) -> None:
    lost = await claim(store, token="lost")
    assert await store.take_over(DIGEST, "someone-else", "new", "/report") is None
    taken = await asyncio.gather(
        *(store.take_over(DIGEST, "lost", f"new{n}", "/report") for n in range(20))
    )
    [started] = [at for at in taken if at is not None]
    assert started >= lost
    holder = (await store.lookup(DIGEST, "third", "/report")).holder
    assert holder is not None
    assert holder.startswith("new")
    # The lost job, should it end after all, stores nothing; the new one does.
    assert await store.commit(DIGEST, "lost", lost, write(b"late")) is Committed.REFUSED
    assert await store.commit(DIGEST, holder, started, write()) is Committed.STORED
    assert (await store.lookup(DIGEST, "x", "/report")).entry == b"entry"


async def test_a_failure_without_a_stale_copy_is_stored(store: Store) -> None:
    await store_one(store, entry=b"error", failed=True)
    assert (await store.lookup(DIGEST, "a", "/report")).entry == b"error"


async def test_concurrent_lookups_claim_exactly_once(store: Store) -> None:
    found = await asyncio.gather(*(store.lookup(DIGEST, f"t{i}", "/report") for i in range(200)))
    assert sum(lookup.claimed for lookup in found) == 1


def digest(n: int) -> str:
    return f"{n:032x}"


async def test_invalidate_by_path_takes_every_query_variant(store: Store) -> None:
    await store_one(store, digest(1), path="/report", query=b"year=2025")
    await store_one(store, digest(2), path="/report", query=b"year=2026")
    await store_one(store, digest(3), path="/other", query=b"")
    assert await store.invalidate(ByPath("/report")) == 2
    assert (await store.lookup(digest(1), "x", "/report")).entry is None
    assert (await store.lookup(digest(2), "x", "/report")).entry is None
    assert (await store.lookup(digest(3), "x", "/report")).entry == b"entry"
    assert await store.invalidate(ByPath("/report")) == 0


async def test_invalidate_by_glob(store: Store) -> None:
    await store_one(store, digest(1), path="/reports/1")
    await store_one(store, digest(2), path="/reports/2/pdf")
    await store_one(store, digest(3), path="/reportsX")
    await store_one(store, digest(4), path="/users/1")
    assert await store.invalidate(ByGlob("/reports/*")) == 2
    assert (await store.lookup(digest(3), "x", "/report")).entry == b"entry"
    assert (await store.lookup(digest(4), "x", "/report")).entry == b"entry"
    assert await store.invalidate(ByGlob("*")) == 2


@pytest.mark.parametrize(
    ("query", "params", "matches"),
    [
        (b"a=1&b=2", (("a", "1"),), True),
        (b"b=2&a=1", (("a", "1"), ("b", "2")), True),  # order does not matter
        (b"a=1&a=2", (("a", "2"),), True),  # repeated names
        (b"a=1&a=2", (("a", "1"), ("a", "2")), True),
        (b"a=10", (("a", "1"),), False),  # no substring matches (the gem's SQL LIKE bug)
        (b"xa=1", (("a", "1"),), False),
        (b"name=J%C3%BCrgen", (("name", "Jürgen"),), True),  # percent-encoding
        (b"q=a+b", (("q", "a b"),), True),
        (b"q=a%26b", (("q", "a&b"),), True),
        (b"flag", (("flag", ""),), True),
        (b"a=1", (("b", "1"),), False),
    ],
)
async def test_invalidate_by_query(
    store: Store, query: bytes, params: tuple[tuple[str, str], ...], matches: bool
) -> None:
    await store_one(store, digest(1), path="/foo", query=query)
    await store_one(store, digest(2), path="/foo", query=b"other=1")
    assert await store.invalidate(ByQuery("/foo", params)) == int(matches)
    assert ((await store.lookup(digest(1), "x", "/report")).entry is None) is matches
    assert (await store.lookup(digest(2), "x", "/report")).entry == b"entry"


async def test_invalidate_by_tag(store: Store) -> None:
    await store_one(store, digest(1), path="/a", tags=("report-42", "user-7"))
    await store_one(store, digest(2), path="/b", tags=("user-7",))
    await store_one(store, digest(3), path="/c", tags=("report-43",))
    assert await store.invalidate(ByTag("user-7")) == 2
    assert (await store.lookup(digest(3), "x", "/report")).entry == b"entry"
    assert await store.invalidate(ByTag("report-42")) == 0  # already gone


async def test_soft_invalidation_marks_stale_and_one_refresh_runs(store: Store) -> None:
    await store_one(store, fresh=60, keep=60)
    assert await store.invalidate(ByPath("/report"), soft=True) == 1
    assert await store.lookup(DIGEST, "a", "/report") == Lookup(b"entry", stale=True, claimed=True)
    assert await store.lookup(DIGEST, "b", "/report") == Lookup(b"entry", stale=True, claimed=False)


BODY = bytes(range(256)) * 5000 + b"end"
"""A body stored apart: 1,280,003 bytes, more than one piece of the Redis store's writes."""


def apart(version: str, chunks: tuple[bytes, ...] | None = None) -> Body:
    """`BODY` as a job stores it apart (in a few odd-sized chunks, unless `chunks`)."""
    if chunks is None:
        chunks = (BODY[:7], BODY[7:700_000], BODY[700_000:700_001], BODY[700_001:])
    return Body(version, chunks, sum(map(len, chunks)))


async def read_all(store: Store, version: str, length: int = len(BODY)) -> bytes | None:
    return await store.read_body(DIGEST, version, length, 0, length)


@pytest.mark.parametrize(
    "chunks",
    [None, (BODY,), tuple(BODY[at : at + 1000] for at in range(0, len(BODY), 1000))],
    ids=["odd", "whole", "small"],
)
async def test_a_body_stored_apart_is_read_back_by_range(
    store: Store, chunks: tuple[bytes, ...] | None
) -> None:
    await store_one(store, entry=b"head", body=apart("v1", chunks))
    assert (await store.lookup(DIGEST, "a", "/report")).entry == b"head"
    assert await read_all(store, "v1") == BODY
    for start, stop in [(0, 1), (5, 10), (699_999, 700_003), (len(BODY) - 3, len(BODY))]:
        assert await store.read_body(DIGEST, "v1", len(BODY), start, stop) == BODY[start:stop]
    # Another version, or a length that is not the body's: not this body.
    assert await read_all(store, "v2") is None
    assert await read_all(store, "v1", len(BODY) + 1) is None


async def test_a_body_stored_apart_lives_and_dies_with_its_entry(store: Store) -> None:
    await store_one(store, body=apart("v1"), fresh=0.2, keep=0.4)
    assert await store.invalidate(ByPath("/report"), soft=True) == 1
    assert await read_all(store, "v1") == BODY  # stale: still served whole
    await asyncio.sleep(0.45)
    assert await read_all(store, "v1") is None
    await store_one(store, token="t2", body=apart("v2"))
    assert await store.invalidate(ByPath("/report")) == 1
    assert await read_all(store, "v2") is None
    await store_one(store, token="t3", body=apart("v3"), tags=("report-42",))
    assert await store.invalidate(ByTag("report-42")) == 1
    assert await read_all(store, "v3") is None


async def test_a_replaced_body_stays_readable_a_while_and_discard_spares_a_newer_one(
    store: Store,
) -> None:
    await store_one(store, body=apart("v1"), fresh=0.05)
    await asyncio.sleep(0.1)  # stale: the refresh claims
    await store_one(store, token="t2", body=apart("v2"))
    # Hits still streaming the first may finish (REPLACED_BODY_GRACE), and see no other.
    assert await read_all(store, "v1") == BODY
    assert await read_all(store, "v2") == BODY
    await store.discard(DIGEST, "v1")  # found gone by a hit of the old entry: too late
    assert await read_all(store, "v2") == BODY
    await store.discard(DIGEST, "v2")
    assert await read_all(store, "v2") is None
    assert (await store.lookup(DIGEST, "x", "/report")).entry is None


async def test_a_refused_commit_leaves_no_body(store: Store) -> None:
    started = await claim(store)
    await store.invalidate(ByPath("/report"))
    refused = await store.commit(DIGEST, "job", started, write(b"head", body=apart("v1")))
    assert refused is Committed.REFUSED
    assert await read_all(store, "v1") is None


async def test_a_commit_sent_again_after_it_stored_keeps_its_body(store: Store) -> None:
    started = await claim(store)
    sent = write(b"head", body=apart("v1"))
    assert await store.commit(DIGEST, "job", started, sent) is Committed.STORED
    assert await store.commit(DIGEST, "job", started, sent) is Committed.REFUSED  # reply lost
    assert await read_all(store, "v1") == BODY


async def test_a_body_not_whole_at_the_commit_is_never_stored(redis: Redis, prefix: str) -> None:
    # Evicted while it was written: the commit finds it short, and refuses it.
    store = RedisStore(redis, prefix=prefix, claim_ttl=5)
    started = await claim(store)
    key = RedisKeys(prefix).body(DIGEST, "v1")
    real = store._write_body

    async def then_evicted(name: str, body: Body) -> None:
        await real(name, body)
        await redis.delete(name)

    store._write_body = then_evicted  # type: ignore[method-assign,assignment]
    refused = await store.commit(DIGEST, "job", started, write(b"head", body=apart("v1")))
    assert refused is Committed.REFUSED
    assert not await redis.exists(key, RedisKeys(prefix).response(DIGEST))
    assert (await store.lookup(DIGEST, "next", "/report")).claimed  # the next job runs


async def start_job(store: Store, renewed: bool) -> float:
    """A job's start time: its claim's, or the one `begin` took after a long queue wait."""
    started = await claim(store)
    if renewed:
        await asyncio.sleep(0.002)
        begun = await store.begin(DIGEST, "job", "/report")
        assert begun is not None
        started = begun
    return started


@pytest.mark.parametrize("renewed", [False, True], ids=["claimed", "renewed"])
@pytest.mark.parametrize(
    "target",
    [ByPath("/report"), ByGlob("/rep*"), ByQuery("/report", (("year", "2026"),))],
    ids=["path", "glob", "query"],
)
async def test_a_job_that_began_before_an_invalidation_does_not_store(
    store: Store, target: Target, renewed: bool
) -> None:
    # The path is brand new: only the claim registered it, yet the glob finds it.
    started = await start_job(store, renewed)
    await asyncio.sleep(0.002)  # the app runs; data changes; someone invalidates
    await store.invalidate(target)
    outcome = await store.commit(DIGEST, "job", started, write(b"old"))
    assert outcome is Committed.REFUSED
    # The claim is released: the next request starts a job that sees the new data.
    assert (await store.lookup(DIGEST, "next", "/report")).claimed


@pytest.mark.parametrize("renewed", [False, True], ids=["claimed", "renewed"])
async def test_a_job_that_began_before_a_tag_invalidation_does_not_store(
    store: Store, renewed: bool
) -> None:
    started = await start_job(store, renewed)
    await asyncio.sleep(0.002)
    await store.invalidate(ByTag("report-42"))
    tagged = write(b"old", tags=("report-42",))
    assert await store.commit(DIGEST, "job", started, tagged) is Committed.REFUSED


async def test_a_job_that_began_after_an_invalidation_stores(store: Store) -> None:
    await store.invalidate(ByPath("/report"))
    await store.invalidate(ByTag("report-42"))
    await asyncio.sleep(0.002)
    await store_one(store, tags=("report-42",))
    assert (await store.lookup(DIGEST, "x", "/report")).entry == b"entry"


async def test_the_commit_script_names_shared_keys_as_redis_keys_does(
    redis: Redis, prefix: str
) -> None:
    store = RedisStore(redis, prefix=prefix, claim_ttl=LEASE)
    path = "/caf\u00e9/r\u00e9sum\u00e9 \udcff"  # non-ASCII, and a lone surrogate
    await store_one(store, path=path, tags=("report-42",), duration=0.25)
    keys = RedisKeys(prefix)
    named = [keys.path_index(path), keys.paths(), keys.paths_by_expiry(), keys.durations(path)]
    named.append(keys.tag("report-42"))
    assert await redis.exists(*named) == len(named)
    assert await store.typical_duration(path) == 0.25


async def test_the_commit_script_stores_lifetimes_and_query_exactly(
    redis: Redis, prefix: str
) -> None:
    # The commit's arguments travel msgpack-packed and come out as Lua numbers and
    # strings: lifetimes must stay whole milliseconds (even at the 2^31 s cap), and the
    # query bytes intact.
    store = RedisStore(redis, prefix=prefix, claim_ttl=LEASE)
    keep = float(2**31)
    await store_one(store, fresh=1.5, keep=keep, query=b"q=\xff\x00&x=%20")
    keys = RedisKeys(prefix)
    assert 1_400 < await redis.pttl(keys.fresh(DIGEST)) <= 1_500
    assert keep * 1000 - 5_000 < await redis.pttl(keys.response(DIGEST)) <= keep * 1000
    # The path's index holds digest + query, scored by the expiry; the path list (another
    # slot, rescored after the commit) by about the same: when to look at the index again.
    [(member, indexed)] = await redis.zrange(keys.path_index("/report"), 0, -1, withscores=True)
    assert member == DIGEST.encode() + b"q=\xff\x00&x=%20"
    assert abs(indexed - (time.time() + keep) * 1000) < 5_000
    listed = await redis.zscore(keys.paths_by_expiry(), "/report")
    assert listed is not None
    assert abs(listed - indexed) < 5_000


async def test_expired_paths_leave_the_prefix_index(redis: Redis, prefix: str) -> None:
    store = RedisStore(redis, prefix=prefix, claim_ttl=0.2)
    for n in range(3):
        await store_one(store, digest(n), path=f"/old/{n}", fresh=0.1, keep=0.1)
    paths = RedisKeys(prefix).paths()
    assert await redis.zcard(paths) == 3
    await asyncio.sleep(0.45)  # entries and claims (whose leases the paths were kept for) gone
    await store_one(store, digest(9), path="/new")  # a new path prunes expired ones
    assert await redis.zrange(paths, 0, -1) == [b"/new"]
