"""A job rides out a reset connection in each of its Redis steps; one that gives up
releases its claim (docs/failure-modes.md).

Real resets: the worker (and the web side) reach the test Redis through a `ResetProxy`,
which resets each connection that carries the step's command, named by a key or a
script only that step sends. redis-py retries a dead connection by itself (the store's
client once, the queue's 4 times over about 1.2 s): the resets here outlast that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from asgi_worker import Config, ReplayWorker
from asgi_worker.backends.redis import scripts
from asgi_worker.core.keys import RedisKeys

from .apps import make_app
from .conftest import REDIS_URL
from .helpers import claim_keys, make_config, queued
from .reset_proxy import ResetProxy, reset_proxy
from .test_arq_worker import drain, get

COMMIT = hashlib.sha1(scripts.COMMIT.encode()).hexdigest().encode()
"""What every commit sends (EVALSHA <its SHA-1>), alone or in the end-of-job MULTI."""


@pytest.fixture
async def proxy() -> AsyncIterator[ResetProxy]:
    port = urlsplit(REDIS_URL).port or 6379
    async with reset_proxy(port) as started:
        yield started


def listing(config: Config) -> bytes:
    """A key only `Store.list_path` sends: the count of each path's listings."""
    return RedisKeys(config.prefix).path_listings().encode()


async def test_a_reset_inside_list_path_is_retried_and_the_job_stores(
    proxy: ResetProxy, prefix: str, redis: Redis
) -> None:
    config = make_config(prefix, redis_url=proxy.url)
    app = make_app(config)
    assert (await get(app, "/echo?a=1")).status_code == 202
    proxy.reset_on(listing(config), times=3)

    worker = await drain(app, config, ReplayWorker)

    assert proxy.resets == 3
    assert worker.jobs_complete == 1
    assert (await get(app, "/echo?a=1")).status_code == 200


@pytest.mark.parametrize("where", ["alone", "in-the-transaction"])
async def test_a_reset_commit_is_sent_again_and_stores_once(
    where: str, proxy: ResetProxy, prefix: str, redis: Redis
) -> None:
    # Alone: the queue is on another Redis (the direct URL), so the job commits itself
    # through the store's client. In the transaction: `ReplayWorker` sends it in arq's
    # end-of-job MULTI, on the queue's client, whose own retries take 5 resets.
    queue_url = REDIS_URL if where == "alone" else None
    config = make_config(prefix, redis_url=proxy.url, queue_redis_url=queue_url)
    calls: Counter[str] = Counter()
    app = make_app(config, calls)
    assert (await get(app, "/echo?a=1")).status_code == 202
    proxy.reset_on(COMMIT, times=3 if where == "alone" else 6)

    # Not a job whose end was lost, run again once its lease (75 s) is over.
    async with asyncio.timeout(10):
        await drain(app, config, ReplayWorker)

    assert proxy.resets == (3 if where == "alone" else 6)
    assert calls["/echo"] == 1
    assert (await get(app, "/echo?a=1")).status_code == 200
    assert await claim_keys(redis, prefix) == []
    assert await queued(redis, config) == 0


async def test_a_job_that_gives_up_releases_its_claim(
    proxy: ResetProxy, prefix: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # list_path is reset for as long as the job tries (redis_timeout): it gives up, and
    # its claim goes with it, so the next request enqueues the job again at once (a claim
    # left to its lease would answer 202 with no job for a minute and a half).
    config = make_config(prefix, redis_url=proxy.url, redis_timeout=0.5)
    app = make_app(config)
    assert (await get(app, "/echo?a=1")).status_code == 202
    proxy.reset_on(listing(config), times=1000)

    with caplog.at_level(logging.INFO, logger="asgi_worker"):
        worker = await drain(app, config, ReplayWorker)

    assert worker.jobs_complete == 1
    assert any("GET /echo?a=1: failed (ConnectionError)" in m for m in caplog.messages)
    [given_up] = [m for m in caplog.messages if "Redis failed before the app ran" in m]
    assert "its claim is released: the next request enqueues it again" in given_up
    assert await claim_keys(redis, prefix) == []
    assert (await get(app, "/echo?a=1")).status_code == 202
    assert await queued(redis, config) == 1  # enqueued again

    proxy.reset_on(b"", times=0)
    await drain(app, config, ReplayWorker)
    assert (await get(app, "/echo?a=1")).status_code == 200
