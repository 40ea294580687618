"""`asgi-worker invalidate` against real Redis."""

from __future__ import annotations

import asyncio

import pytest
from click.testing import CliRunner
from redis.asyncio import Redis

from asgi_worker import Config
from asgi_worker.backends.base import Write
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.cli.commands import main

from .conftest import REDIS_URL


async def stored(
    redis: Redis, config: Config, digest: str, path: str, query: bytes, tags: tuple[str, ...] = ()
) -> None:
    store = RedisStore(redis, prefix=config.prefix, claim_ttl=config.claim_lease)
    started = (await store.lookup(digest, "t", path)).claimed_at
    await store.list_path(path)  # as the job does before its app runs
    assert started is not None
    await store.commit(
        digest, "t", started, Write(b"x", fresh=60, keep=60, path=path, query=query, tags=tags)
    )


def run(config: Config, *arguments: str) -> tuple[int, str]:
    env = {"ASGI_WORKER_REDIS_URL": REDIS_URL, "ASGI_WORKER_PREFIX": config.prefix}
    result = CliRunner().invoke(main, ["invalidate", *arguments], env=env)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("arguments", "output"),
    [
        (("path", "/reports"), "2 entries invalidated"),
        (("prefix", "/rep"), "3 entries invalidated"),
        (("glob", "/reports/*"), "1 entry invalidated"),
        (("query", "/reports", "year=2026"), "1 entry invalidated"),
        (("tag", "t1"), "2 entries invalidated"),
        (("tag", "t1", "--soft"), "2 entries marked stale"),
        (("path", "/nothing"), "0 entries invalidated"),
    ],
)
async def test_invalidate_command(
    config: Config, redis: Redis, arguments: tuple[str, ...], output: str
) -> None:
    await stored(redis, config, "1" * 32, "/reports", b"year=2026", ("t1",))
    await stored(redis, config, "2" * 32, "/reports", b"year=2025", ("t1",))
    await stored(redis, config, "3" * 32, "/reports/pdf", b"")
    # The command runs its own event loop: give it a thread, as a shell would a process.
    code, text = await asyncio.to_thread(run, config, *arguments)
    assert (code, text.strip()) == (0, output)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("query", "/reports"), "'query' needs them"),
        (("path", "/reports", "a=1"), "NAME=VALUE pairs go with 'query'"),
        (("query", "/reports", "novalue"), "is not NAME=VALUE"),
        (("everything", "/"), "Invalid value for '{path|prefix|glob|query|tag}'"),
    ],
)
def test_invalidate_command_refuses_bad_input(
    config: Config, arguments: tuple[str, ...], message: str
) -> None:
    code, text = run(config, *arguments)
    assert code == 2
    assert message in text


def test_invalidate_command_reports_redis_down(config: Config) -> None:
    env = {"ASGI_WORKER_REDIS_URL": "redis://127.0.0.1:1/0", "ASGI_WORKER_REDIS_TIMEOUT": "0.5"}
    result = CliRunner().invoke(main, ["invalidate", "path", "/x"], env=env)
    assert result.exit_code == 1
    assert "Redis at redis://127.0.0.1:1/0" in result.output
