"""`run_job` on both stores: the claim's time is the job's start, unless the lease is short.

A job that runs soon after its claim costs one store round trip (the commit). One that
waited in the queue until its lease could run out mid-job, or that carries no claim time
(enqueued by an earlier version), renews the claim with `Store.begin` first; if the claim
was lost meanwhile, the app is not run at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from asgi_worker import Config
from asgi_worker.backends.base import Store
from asgi_worker.backends.memory import MemoryStore
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.codec import decode_response, encode_snapshot
from asgi_worker.core.keys import RequestSnapshot
from asgi_worker.worker.job import run_job

from .conftest import REDIS_URL

# The lease (0.5 s) covers job_timeout + redis_timeout (0.4 s) only in its first 0.1 s.
JOB_TIMEOUT = 0.2
LEASE = 0.5
SNAPSHOT = RequestSnapshot("http", "testserver", "", "/report", None, b"year=2026", ())


class BeginCountingStore:
    """The real store, with its `begin` calls counted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.begins = 0

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        self.begins += 1
        return await self.store.begin(digest, token, path)

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)


@pytest.fixture(params=["redis", "memory"])
async def store(
    request: pytest.FixtureRequest, redis: Redis, prefix: str
) -> AsyncIterator[BeginCountingStore]:
    if request.param == "redis":
        yield BeginCountingStore(RedisStore(redis, prefix=prefix, claim_ttl=LEASE))
    else:
        yield BeginCountingStore(MemoryStore(claim_ttl=LEASE))


@pytest.fixture
def job_config(prefix: str) -> Config:
    return Config(
        redis_url=REDIS_URL,
        prefix=prefix,
        job_timeout=JOB_TIMEOUT,
        claim_ttl=LEASE,
        redis_timeout=0.2,
    )


class CountingApp:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"report"})


async def claim(store: Store, token: str) -> float:
    claimed_at = (await store.lookup(SNAPSHOT.digest, token, SNAPSHOT.path)).claimed_at
    assert claimed_at is not None
    return claimed_at


async def run(store: Store, config: Config, token: str, claimed_at: float | None) -> str:
    app = CountingApp()
    outcome = await run_job(app, store, config, encode_snapshot(SNAPSHOT), token, claimed_at)
    return f"{outcome}, app ran {app.calls}x"


async def stored_body(store: Store) -> bytes | None:
    entry = (await store.lookup(SNAPSHOT.digest, "reader", SNAPSHOT.path)).entry
    return None if entry is None else decode_response(entry).body


async def test_a_job_started_soon_after_its_claim_does_not_renew_it(
    store: BeginCountingStore, job_config: Config
) -> None:
    claimed_at = await claim(store, "job")
    assert await run(store, job_config, "job", claimed_at) == "stored, app ran 1x"
    assert store.begins == 0
    assert await stored_body(store) == b"report"


async def test_a_job_whose_lease_may_run_out_renews_it_first(
    store: BeginCountingStore, job_config: Config
) -> None:
    claimed_at = await claim(store, "job")
    await asyncio.sleep(0.15)  # queued: 0.35 s of lease left, the job may need 0.4 s
    assert await run(store, job_config, "job", claimed_at) == "stored, app ran 1x"
    assert store.begins == 1
    assert await stored_body(store) == b"report"


async def test_a_job_without_a_claim_time_renews_its_claim(
    store: BeginCountingStore, job_config: Config
) -> None:
    await claim(store, "job")
    assert await run(store, job_config, "job", None) == "stored, app ran 1x"
    assert store.begins == 1


async def test_a_job_whose_claim_was_taken_over_does_not_run(
    store: BeginCountingStore, job_config: Config
) -> None:
    claimed_at = await claim(store, "old")
    await asyncio.sleep(LEASE + 0.05)  # the lease ran out while the job was queued
    await claim(store, "new")
    assert await run(store, job_config, "old", claimed_at) == "superseded, app ran 0x"
    assert await stored_body(store) is None
