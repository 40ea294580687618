"""The optional in-process near cache: bounded by time and bytes, evicted by events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from asgi_worker import Config
from asgi_worker.invalidation import Invalidator
from asgi_worker.keys import RedisKeys
from asgi_worker.near import NearCache

from .conftest import backend
from .test_freshness import Site, open_site

# On the Cluster, events are heard through one node while commits publish on others.
kind = pytest.fixture(params=["arq", "inline", "cluster"], name="kind")(backend)


@pytest.fixture
async def site(kind: str, config: Config) -> AsyncIterator[Site]:
    async for value in open_site(kind, config, near_cache_ttl=0.5):
        yield value


async def remove_behind_its_back(redis: Redis | RedisCluster, config: Config, digest: str) -> None:
    """Delete the entry in Redis without announcing it, as if it had expired there."""
    keys = RedisKeys(config.prefix)
    assert await redis.delete(keys.response(digest), keys.fresh(digest)) == 2


async def digest_of_counter(redis: Redis | RedisCluster, config: Config) -> str:
    pattern = f"{config.prefix}:{{*}}*:resp"
    entries = [key.decode() async for key in redis.scan_iter(match=pattern)]
    assert len(entries) == 1
    named = entries[0][len(config.prefix) + 1 : -len(":resp")]
    return named.replace("{", "").replace("}", "")


async def test_hot_hits_are_served_in_process_for_the_micro_ttl(
    site: Site, config: Config, store_redis: Redis | RedisCluster
) -> None:
    await site.ready("/counter")  # that hit started the event listener
    await asyncio.sleep(0.1)  # subscribed by now: the near cache is in use
    await site.http.get("/counter")  # puts it in the near cache
    digest = await digest_of_counter(store_redis, config)
    await remove_behind_its_back(store_redis, config, digest)
    near_hit = await site.http.get("/counter")
    assert (near_hit.status_code, near_hit.text) == (200, "run 1")
    await asyncio.sleep(0.55)
    assert (await site.http.get("/counter")).status_code == 202  # never older than the ttl


async def test_age_of_hits_and_near_hits_ignores_the_web_hosts_wall_clock(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Age is Redis's time of the lookup minus the entry's stored_at (Redis's time too),
    # and a near hit counts on from its lookup by the monotonic clock: a step of this
    # host's wall clock moves neither.
    await site.ready("/counter")
    await asyncio.sleep(0.1)  # subscribed by now: the near cache is in use
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600)
    hit = await site.http.get("/counter")  # read from Redis, kept in the near cache
    near_hit = await site.http.get("/counter")
    assert max(int(hit.headers["age"]), int(near_hit.headers["age"])) <= 1


async def test_an_invalidation_evicts_at_once(site: Site) -> None:
    await site.ready("/counter")
    await asyncio.sleep(0.1)
    await site.http.get("/counter")
    assert await Invalidator.for_app(site.app).path("/counter") == 1
    deadline = time.monotonic() + 0.2  # one pub/sub message, far below the 0.5 s ttl
    while (await site.http.get("/counter")).status_code != 202:
        assert time.monotonic() < deadline, "the near cache kept serving an invalidated key"
        await asyncio.sleep(0.01)


async def test_a_new_version_evicts_the_old_one(site: Site) -> None:
    await site.ready("/counter")
    await asyncio.sleep(0.1)
    await site.http.get("/counter")
    assert await Invalidator.for_app(site.app).path("/counter", soft=True) == 1
    await asyncio.sleep(0.05)
    assert (await site.http.get("/counter")).headers["cache-status"].endswith("fwd=stale")


def test_near_cache_is_bounded_by_bytes_least_recently_used_first() -> None:
    room_for_three: NearCache[str] = NearCache(ttl=60, max_bytes=100_000)
    for name in "abc":
        room_for_three.put(name, name, 1000)
    near: NearCache[str] = NearCache(ttl=60, max_bytes=room_for_three.nbytes)
    for name in "abc":
        near.put(name, name, 1000)
    assert near.get("a") == "a"  # a is now the most recently used
    near.put("d", "d", 1000)
    assert near.get("b") is None
    assert [near.get(name) for name in "acd"] == ["a", "c", "d"]
    near.put("huge", "huge", 10_000)  # larger than the whole cache: not kept
    assert near.get("huge") is None
    assert len(near) == 3


def test_near_cache_entries_expire() -> None:
    near: NearCache[str] = NearCache(ttl=0.05, max_bytes=10_000)
    near.put("a", "a", 10)
    assert near.get("a") == "a"
    time.sleep(0.06)
    assert near.get("a") is None
    assert len(near) == 0
