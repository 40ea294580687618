"""connections.BufferCheckingPool: no socket read per checkout, and still no dirty reuse."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import Connection

from asgi_worker import Config
from asgi_worker.backends.redis.clients import BufferCheckingPool, has_leftovers, redis_client

from .conftest import REDIS_URL


async def _until(condition: Any, seconds: float = 2.0) -> None:
    """Wait until `condition()` is true: the event loop has read what arrived."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "the condition never became true"
        await asyncio.sleep(0.005)


async def _one_pooled_connection(client: Redis) -> Connection:
    """The pool's only connection, handed back after use (as between two commands)."""
    await client.ping()
    pool: Any = client.connection_pool
    [connection] = pool._available_connections
    assert isinstance(connection, Connection)
    return connection


async def test_commands_never_probe_the_socket(
    prefix: str, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's own check reads the socket under a zero timeout; ours must not call it.
    probed: list[object] = []

    async def probe(self: Connection) -> bool:
        probed.append(self)
        return False

    monkeypatch.setattr(Connection, "can_read_destructive", probe)
    client = redis_client(REDIS_URL, Config(redis_url=REDIS_URL, prefix=prefix))
    try:
        for i in range(20):
            await client.set(f"{prefix}:k", i)
        assert await client.get(f"{prefix}:k") == b"19"
        # The fast path is taken: the installed redis-py and hiredis are the ones the
        # pool understands (a None here would mean the slow check runs every time).
        assert has_leftovers(await _one_pooled_connection(client)) is False
    finally:
        await client.aclose(close_connection_pool=True)
    assert probed == []


async def test_a_connection_with_an_unread_reply_is_replaced(prefix: str, redis: Redis) -> None:
    await redis.set(f"{prefix}:k", b"value")
    # No retries: the pool's check alone must keep the next command from reading the
    # stale reply as its own.
    client = Redis(connection_pool=BufferCheckingPool.from_url(REDIS_URL))
    try:
        connection = await _one_pooled_connection(client)
        await connection.send_command("PING")  # a reply nobody will read
        await _until(lambda: has_leftovers(connection))
        assert await client.get(f"{prefix}:k") == b"value"  # not b"PONG"
        assert has_leftovers(connection) is False
    finally:
        await client.aclose(close_connection_pool=True)


async def test_a_connection_the_server_closed_is_replaced(prefix: str, redis: Redis) -> None:
    client = Redis(connection_pool=BufferCheckingPool.from_url(REDIS_URL))
    try:
        await client.client_setname(f"{prefix}-victim")
        connection = await _one_pooled_connection(client)
        await redis.client_kill_filter(_id=await client.client_id())
        await _until(lambda: has_leftovers(connection))  # EOF seen by the event loop
        # No retries here either: the check reconnects before the command is sent.
        await client.set(f"{prefix}:k", b"after")
        assert await redis.get(f"{prefix}:k") == b"after"
    finally:
        await client.aclose(close_connection_pool=True)


class _ReaderWithoutHasData:
    """A hiredis reader as older hiredis releases made it: no `has_data`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def gets(self, *args: Any) -> Any:
        return self._inner.gets(*args)

    def feed(self, *args: Any) -> Any:
        return self._inner.feed(*args)


async def test_unknown_connection_internals_fall_back_to_redis_pys_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[object] = []
    original = ConnectionPool.ensure_connection

    async def upstream_check(self: ConnectionPool, connection: Any) -> None:
        checked.append(connection)
        await original(self, connection)

    monkeypatch.setattr(ConnectionPool, "ensure_connection", upstream_check)
    client = Redis(connection_pool=BufferCheckingPool.from_url(REDIS_URL))
    try:
        connection = await _one_pooled_connection(client)
        parser: Any = connection._parser
        parser._reader = _ReaderWithoutHasData(parser._reader)
        assert has_leftovers(connection) is None
        assert await client.ping() is True
        assert checked == [connection]
    finally:
        await client.aclose(close_connection_pool=True)
