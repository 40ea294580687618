"""Shared fixtures: real Redis, a key prefix per test, and clean-up of only our keys."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from asgi_worker import Config
from asgi_worker.backends.redis.clients import close_client, store_client

from .own_cluster import OwnCluster, own_cluster

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test (or process) uses."""
    return f"awtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Redis]:
    """A client on the test Redis; deletes this test's keys (and only those) afterwards."""
    client = Redis.from_url(REDIS_URL)
    await client.ping()  # no Redis is a failure, never a skip
    yield client
    # Our keys start with the prefix; arq's job keys (arq:job:<id>, ...) hold it in the id.
    for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
        async for key in client.scan_iter(match=pattern, count=1000):
            await client.delete(key)
    await client.aclose()


@pytest.fixture
def config(prefix: str, redis: Redis, request: pytest.FixtureRequest) -> Config:
    """A Config on the test Redis under this test's prefix (its own arq queue too).

    Where the test's `kind` is `cluster` (modules that add it, see `WITH_CLUSTER`), the
    store is on the module's Redis Cluster and the arq queue on the test Redis.
    """
    config = Config(redis_url=REDIS_URL, prefix=prefix, ttl=60, retry_after=1)
    if "kind" in request.fixturenames and request.getfixturevalue("kind") == "cluster":
        cluster: OwnCluster = request.getfixturevalue("cluster")
        return dataclasses.replace(config, redis_url=cluster.url, queue_redis_url=REDIS_URL)
    return config


BACKENDS = ["arq", "inline", "memory"]
"""arq: Redis store, real arq worker. inline: Redis store, jobs in process. memory: memory://."""
WITH_CLUSTER = [*BACKENDS, "cluster"]
"""The same, and `cluster`: the store on a Redis Cluster of 3 masters, a real arq worker.

A module runs its tests on it too with `kind = pytest.fixture(params=WITH_CLUSTER)(backend)`."""


def backend(request: pytest.FixtureRequest) -> str:
    """The body of a `kind` fixture: the backend of this parametrisation."""
    return str(request.param)


kind = pytest.fixture(params=BACKENDS, name="kind")(backend)
"""Each backend in turn (see helpers.backend_config)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnCluster]:
    """A Redis Cluster of 3 masters for the module (see own_cluster.py), stopped after it.

    Tests on it need no clean-up: each uses its own prefix, and the cluster goes with the
    module.
    """
    with own_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
async def store_redis(config: Config) -> AsyncIterator[Redis | RedisCluster]:
    """A client on the store of `config`: the test Redis, or the module's Cluster."""
    client = store_client(config.redis_url, config)
    yield client
    await close_client(client)
