"""The `Store` contract, on `RedisStore` and `MemoryStore` alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_worker.memory import MemoryStore
from asgi_worker.store import Lookup, Outcome, RedisStore, Store

LEASE = 0.3
DIGEST = "0123456789abcdef0123456789abcdef"


@pytest.fixture(params=["redis", "memory"])
async def store(request: pytest.FixtureRequest, redis: Redis, prefix: str) -> AsyncIterator[Store]:
    if request.param == "redis":
        yield RedisStore(redis, prefix=prefix, claim_ttl=LEASE)
    else:
        yield MemoryStore(claim_ttl=LEASE)


async def test_first_lookup_claims_others_wait(store: Store) -> None:
    assert await store.lookup(DIGEST, "a") == Lookup(Outcome.CLAIMED)
    assert await store.lookup(DIGEST, "b") == Lookup(Outcome.PENDING)


async def test_lease_runs_out_and_the_next_request_claims_again(store: Store) -> None:
    assert (await store.lookup(DIGEST, "dead-worker")).outcome is Outcome.CLAIMED
    await asyncio.sleep(LEASE + 0.1)
    assert (await store.lookup(DIGEST, "next")).outcome is Outcome.CLAIMED


async def test_commit_stores_and_releases_its_own_claim(store: Store) -> None:
    await store.lookup(DIGEST, "a")
    await store.commit(DIGEST, "a", b"entry", ttl=5)
    assert await store.lookup(DIGEST, "b") == Lookup(Outcome.HIT, b"entry")
    await store.discard(DIGEST)
    assert (await store.lookup(DIGEST, "c")).outcome is Outcome.CLAIMED


async def test_a_stale_token_does_not_release_a_newer_claim(store: Store) -> None:
    await store.lookup(DIGEST, "old")
    await asyncio.sleep(LEASE + 0.1)
    await store.lookup(DIGEST, "new")
    await store.release(DIGEST, "old")
    assert (await store.lookup(DIGEST, "third")).outcome is Outcome.PENDING


async def test_entries_expire(store: Store) -> None:
    await store.commit(DIGEST, "a", b"entry", ttl=0.2)
    assert (await store.lookup(DIGEST, "b")).outcome is Outcome.HIT
    await asyncio.sleep(0.3)
    assert (await store.lookup(DIGEST, "c")).outcome is Outcome.CLAIMED


async def test_concurrent_lookups_claim_exactly_once(store: Store) -> None:
    found = await asyncio.gather(*(store.lookup(DIGEST, f"t{i}") for i in range(200)))
    outcomes = [lookup.outcome for lookup in found]
    assert outcomes.count(Outcome.CLAIMED) == 1
    assert outcomes.count(Outcome.PENDING) == 199
