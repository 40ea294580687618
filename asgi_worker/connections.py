"""A redis-py connection pool that checks a connection without reading from its socket.

redis-py 5 (the line arq allows) makes sure a pooled connection is clean before every
command by reading from its socket under a zero timeout: the read cannot finish, so the
timeout cancels it. That costs a timer and a cancelled read, about a quarter of the CPU
time of a small command. redis-py 8 replaced it (redis/redis-py#4063) with a look at what
the connection has already buffered, which this pool does too:

- the event loop keeps reading every open connection, so bytes nobody asked for (a
  connection handed back with a reply unread) are already in its stream buffer, or in
  hiredis's, and a connection the server closed is already at EOF;
- such a connection is closed and opened again before use, as redis-py does;
- a connection that dies between that look and the command fails the command, and the
  clients here retry a connection error once on a new connection (`redis_client`).

If the connection's internals are not the ones this was written against (another parser,
another redis-py), the pool falls back to redis-py's own check.
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .config import Config

# How long a pooled connection may sit idle before its next use PINGs it first.
_HEALTH_CHECK_SECONDS = 15


class BufferCheckingPool(ConnectionPool):
    """`ConnectionPool` whose pre-command check reads no socket (see the module doc)."""

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        """Connect if needed; replace the connection if it holds leftovers or saw EOF."""
        await _connect(connection)
        leftovers = has_leftovers(connection)
        if leftovers is None:
            await super().ensure_connection(connection)
        elif leftovers:
            await connection.disconnect()
            await _connect(connection)


async def _connect(connection: Any) -> None:
    # redis-py 5 leaves `connect` untyped.
    await connection.connect()


def has_leftovers(connection: AbstractConnection) -> bool | None:
    """True if the connection has unread bytes or its server hung up; None if unknown.

    Looks at the asyncio stream's buffer and hiredis's reader, both private: any change
    in their shape gives None, never a wrong answer.
    """
    stream = getattr(connection, "_reader", None)
    buffered = getattr(stream, "_buffer", None)
    hiredis_reader = getattr(getattr(connection, "_parser", None), "_reader", None)
    has_data = getattr(hiredis_reader, "has_data", None)
    if not (
        isinstance(stream, asyncio.StreamReader)
        and isinstance(buffered, bytearray)
        and callable(has_data)
    ):
        return None
    return stream.at_eof() or bool(buffered) or bool(has_data())


def redis_client(url: str, config: Config, *, read_timeout: bool = True) -> ArqRedis:
    """A client for `url` that gives up connecting after `config.redis_timeout` seconds.

    With `read_timeout` every reply is awaited at most that long too. The web process
    turns it off: redis-py's per-read timer costs the hit path a third of its time, so
    the middleware bounds each request with one `asyncio.timeout` instead, and the event
    subscription must be able to sit idle. Keepalives and health checks still find a
    dead connection.
    """
    pool = BufferCheckingPool.from_url(
        url,
        socket_timeout=config.redis_timeout if read_timeout else None,
        socket_connect_timeout=config.redis_timeout,
        socket_keepalive=True,
        health_check_interval=_HEALTH_CHECK_SECONDS,
        # A pooled connection found dead (Redis restarted) is retried once on a new one,
        # so a restart costs no request a 503. Every command we send is safe to repeat.
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
    )
    return ArqRedis(pool_or_conn=pool, default_queue_name=config.queue)
