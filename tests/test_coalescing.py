"""Single-flight lookups (`Config.coalesce`): one lookup per key in flight per process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from asgi_worker import Config
from asgi_worker.backends.base import Lookup, Store
from asgi_worker.testing import find_middleware

from .test_freshness import Site, open_site


class SlowCountingStore:
    """Wraps the real store: counts lookups and keeps each in flight for a while."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lookups = 0
        self.fail = False

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        self.lookups += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise ConnectionError("redis went away")
        return await self.store.lookup(digest, token, path)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


async def counting(site: Site) -> SlowCountingStore:
    await site.ready("/counter")
    middleware = find_middleware(site.app)
    assert middleware is not None
    backend = middleware._open()
    wrapper = SlowCountingStore(backend.store)
    object.__setattr__(backend, "store", wrapper)  # the backend is frozen; tests may reach in
    return wrapper


@pytest.fixture(params=[True, False], ids=["coalesce", "no-coalesce"])
async def site(request: pytest.FixtureRequest, config: Config) -> AsyncIterator[Site]:
    async for value in open_site("memory", config, coalesce=request.param):
        yield value


async def test_concurrent_hits_share_one_lookup(site: Site) -> None:
    store = await counting(site)
    answers = await asyncio.gather(*(site.http.get("/counter") for _ in range(50)))
    assert {(a.status_code, a.text) for a in answers} == {(200, "run 1")}
    coalescing = find_middleware(site.app).config.coalesce  # type: ignore[union-attr]
    assert store.lookups == (1 if coalescing else 50)


async def test_a_failed_shared_lookup_fails_every_waiter(site: Site) -> None:
    store = await counting(site)
    store.fail = True
    answers = await asyncio.gather(*(site.http.get("/counter") for _ in range(10)))
    assert {a.status_code for a in answers} == {503}
    store.fail = False
    assert (await site.http.get("/counter")).status_code == 200


async def test_a_cancelled_leader_lets_the_followers_look_themselves(site: Site) -> None:
    store = await counting(site)
    leader = asyncio.create_task(site.http.get("/counter"))
    await asyncio.sleep(0.01)
    followers = [asyncio.create_task(site.http.get("/counter")) for _ in range(5)]
    await asyncio.sleep(0.01)
    leader.cancel()
    answers = await asyncio.gather(*followers)
    assert {(a.status_code, a.text) for a in answers} == {(200, "run 1")}
    assert store.lookups >= 2
