"""Shared fixtures: real Redis, a key prefix per test, and clean-up of only our keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from asgi_worker import Config

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
def config(prefix: str, redis: Redis) -> Config:
    """A Config on the test Redis under this test's prefix (its own arq queue too)."""
    return Config(redis_url=REDIS_URL, prefix=prefix, ttl=60, retry_after=1)


@pytest.fixture(params=["arq", "inline", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    """Each backend in turn (see helpers.BACKENDS and helpers.backend_config)."""
    return str(request.param)
