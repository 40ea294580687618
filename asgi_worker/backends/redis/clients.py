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

`redis_client` also takes `redis+sentinel://` URLs: the client then talks to whichever
node the Sentinels name master, through redis-py's `SentinelConnectionPool` with the same
check (`SentinelPool`). What drops its connections when the master changes is in
`sentinel.py`.

`store_client` also takes `redis+cluster://` URLs: a redis-py `RedisCluster` with the same
timeouts and retries, which follows MOVED and ASK redirections (and refreshes its slot
map) on its own. A Cluster has no cluster-wide pub/sub in redis-py 5, but a PUBLISH on
any node reaches every node: `NodeSubscriber` subscribes on one node at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any, ClassVar, Protocol

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, DefaultParser
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from asgi_worker.core.config import Config
from asgi_worker.core.redis_urls import (
    SentinelURL,
    TLSOptions,
    display_url,
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
)

# How long a pooled connection may sit idle before its next use PINGs it first.
_HEALTH_CHECK_SECONDS = 15


def tls_kwargs(tls: TLSOptions | None) -> dict[str, Any]:
    """redis-py's keyword arguments for connecting with `tls` (None: no TLS).

    One set of names serves every client built for a Sentinel or Cluster URL: `Redis`
    (a Sentinel, a Cluster node), a Sentinel's `sentinel_kwargs`, the master's
    `SentinelConnectionPool`, `RedisCluster`, and arq's `RedisSettings`.
    """
    if tls is None:
        return {"ssl": False}
    return {
        "ssl": True,
        "ssl_ca_certs": tls.ca_certs,
        "ssl_certfile": tls.certfile,
        "ssl_keyfile": tls.keyfile,
        "ssl_cert_reqs": tls.cert_reqs,
        "ssl_check_hostname": tls.check_hostname,
    }


class BufferCheckingPool(ConnectionPool):
    """`ConnectionPool` whose pre-command check reads no socket (see the module doc)."""

    shown_url = "Redis"
    """The URL this pool connects to, password masked (set by `redis_client`)."""
    another: Callable[[], ArqRedis] | None = None
    """Makes a new client like the one this pool was made for, with a pool of its own
    (for another event loop, another thread); set by `redis_client`."""

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


class ReadOnlyReplicaError(ReadOnlyError):
    """Redis answered READONLY: the node the URL names is a replica, not the master."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} The Redis this URL names is a read-only replica: a master that a "
            "failover demoted? A redis+sentinel:// URL follows the master."
        )


class _Parser(DefaultParser):  # type: ignore[misc, valid-type]  # a variable in redis-py
    """redis-py's parser, with the READONLY error saying what it means for us.

    Only how an error reply is turned into an exception changes (the class's table):
    nothing on the way of a reply that is not an error.
    """

    EXCEPTION_CLASSES: ClassVar[dict[str, Any]] = {
        **DefaultParser.EXCEPTION_CLASSES,
        "READONLY": ReadOnlyReplicaError,
    }


# The states of a failover after the Sentinel doing it has told the chosen replica to
# become master (`SENTINEL MASTER` shows them as `failover-state`).
_PROMOTING = frozenset({"wait_promotion", "reconf_slaves", "update_config"})


class NewestSentinel(Sentinel):
    """redis-py's `Sentinel`, asking every Sentinel and believing the newest configuration.

    redis-py takes the first Sentinel that answers. Around a failover that is often the
    old master, which keeps taking writes until Sentinel turns it into a replica, and
    throws them away then. Here every Sentinel is asked:

    - the Sentinel doing a failover names the replica it has told to become master
      (from then on the old master's writes are lost anyway), before it announces the
      switch (up to a second later: it waits for the replica's next INFO);
    - otherwise the answer with the highest configuration epoch wins (every failover
      increments it; a Sentinel that has not heard of the last one has an older epoch).
    """

    # How long to wait for the other Sentinels once one has named a master.
    answer_grace = 0.05

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        """The address of `service_name`'s master, by the newest configuration heard."""
        asked = [asyncio.create_task(self._ask(s, service_name)) for s in self.sentinels]
        answers: list[tuple[int, int, str, int]] = []
        errors: list[str] = []
        pending = set(asked)
        try:
            while pending and not answers:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                self._collect(done, answers, errors)
            if pending:
                done, pending = await asyncio.wait(pending, timeout=self.answer_grace)
                self._collect(done, answers, errors)
        finally:
            for task in pending:
                task.cancel()
        if not answers:
            raise MasterNotFoundError(f"No master found for {service_name!r}: {errors}")
        _, _, host, port = max(answers)
        return host, port

    async def _ask(self, sentinel: Redis, service_name: str) -> tuple[int, int, str, int] | None:
        """(epoch, promoting, host, port) of the master this Sentinel names, if any."""
        state = await sentinel.sentinel_master(service_name)  # type: ignore[no-untyped-call]
        epoch = int(state.get("config-epoch", 0))
        if state.get("failover-state") in _PROMOTING:
            replicas = await sentinel.sentinel_slaves(service_name)  # type: ignore[no-untyped-call]
            for replica in replicas:
                if "promoted" in str(replica.get("flags", "")).split(","):
                    return epoch, 1, str(replica["ip"]), int(replica["port"])
        if not self.check_master_state(state, service_name):
            return None
        return epoch, 0, str(state["ip"]), int(state["port"])

    @staticmethod
    def _collect(
        done: set[asyncio.Task[tuple[int, int, str, int] | None]],
        answers: list[tuple[int, int, str, int]],
        errors: list[str],
    ) -> None:
        for task in done:
            error = task.exception()
            if error is not None:
                errors.append(repr(error))
            elif (answer := task.result()) is not None:
                answers.append(answer)


class SentinelPool(BufferCheckingPool, SentinelConnectionPool):
    """redis-py's `SentinelConnectionPool` with `BufferCheckingPool`'s check.

    Its connections go to the current master; `sentinel_url` says which master and
    which Sentinels.
    """

    sentinel_url: SentinelURL

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """Drop the connections; a full drop (or close) drops the idle ones to Sentinels too.

        The Sentinels' in-use connections stay: a discovery on its way must not fail.
        """
        await super().disconnect(inuse_connections)
        if inuse_connections:
            manager: Sentinel = self.sentinel_manager
            for sentinel in manager.sentinels:
                await sentinel.connection_pool.disconnect(inuse_connections=False)


def redis_client(
    url: str,
    config: Config,
    *,
    read_timeout: bool = True,
    retry: Retry | None = None,
    client_class: type[ArqRedis] = ArqRedis,
) -> ArqRedis:
    """A client for `url` that gives up connecting after `config.redis_timeout` seconds.

    With `read_timeout` every reply is awaited at most that long too. The web process
    turns it off: redis-py's per-read timer costs the hit path a third of its time, so
    the middleware bounds each request with one `asyncio.timeout` instead, and the event
    subscription must be able to sit idle. Keepalives and health checks still find a
    dead connection.

    `retry` replaces the one immediate retry of a command that met a dead connection;
    with it, timeouts are retried too (the worker's queue client rides out a blip).

    `url` may be a `redis+sentinel://` URL (see `redis_urls.parse_sentinel_url`): the client
    then connects to the master the Sentinels name, and asks them again on every new
    connection. `sentinel.FailoverWatch` drops the connections when the master changes.

    `client_class`: an `ArqRedis` of the caller's, made the same way.
    """
    options: dict[str, Any] = {
        "socket_timeout": config.redis_timeout if read_timeout else None,
        "socket_connect_timeout": config.redis_timeout,
        "socket_keepalive": True,
        "health_check_interval": _HEALTH_CHECK_SECONDS,
        # A pooled connection found dead (Redis restarted, or dropped on a failover) is
        # retried once on a new one, so a restart costs no request a 503. Every command
        # we send is safe to repeat.
        "retry": Retry(NoBackoff(), 1) if retry is None else retry,
        "retry_on_error": [RedisConnectionError]
        if retry is None
        else [RedisConnectionError, RedisTimeoutError],
        "parser_class": _Parser,
    }
    pool: BufferCheckingPool
    if is_sentinel_url(url):
        pool = _sentinel_pool(parse_sentinel_url(url), config, options)
    else:
        pool = BufferCheckingPool.from_url(url, **options)
    pool.shown_url = display_url(url)
    pool.another = partial(redis_client, url, config, read_timeout=read_timeout, retry=retry)
    return client_class(pool_or_conn=pool, default_queue_name=config.queue)


def store_client(url: str, config: Config, *, read_timeout: bool = True) -> Redis | RedisCluster:
    """A client for the cache at `url`: `cluster_client` for a Cluster, else `redis_client`."""
    if is_cluster_url(url):
        return cluster_client(url, config, read_timeout=read_timeout)
    return redis_client(url, config, read_timeout=read_timeout)


async def close_client(client: Redis | RedisCluster) -> None:
    """Close `client` and its connections (a Cluster client closes every node's)."""
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()


# How often a command is tried again after a redirection it could not follow at once, a
# node that went away, or "cluster down" (redis-py re-reads the slot map between tries).
_CLUSTER_ATTEMPTS = 3


def cluster_client(url: str, config: Config, *, read_timeout: bool = True) -> RedisCluster:
    """A `RedisCluster` for a `redis+cluster://` URL, with `redis_client`'s timeouts.

    It learns the slot map from the first startup node that answers, sends each command
    to the master of its key's slot, and follows MOVED (and re-reads the map) and ASK
    (a slot being migrated) by itself. A dead pooled connection is retried once on a
    new one, as in `redis_client`.
    """
    target = parse_cluster_url(url)
    cluster: RedisCluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        **tls_kwargs(target.tls),
        socket_timeout=config.redis_timeout if read_timeout else None,
        socket_connect_timeout=config.redis_timeout,
        socket_keepalive=True,
        health_check_interval=_HEALTH_CHECK_SECONDS,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        cluster_error_retry_attempts=_CLUSTER_ATTEMPTS,
    )
    return cluster


class PubSubSource(Protocol):
    """Where the event listener opens its subscription (see events.py)."""

    def __call__(self) -> AbstractAsyncContextManager[Redis]:
        """A connection to subscribe on, for as long as the subscription lasts."""
        ...


def shared_source(client: Redis) -> PubSubSource:
    """Subscribe through `client` itself (one Redis, or Sentinel's master)."""

    @asynccontextmanager
    async def source() -> AsyncIterator[Redis]:
        yield client

    return source


class NodeSubscriber:
    """Plain connections to a Cluster's nodes for pub/sub, one node after another.

    Redis Cluster forwards every PUBLISH to every node, so one subscription on any node
    hears them all. Each call picks the next node the cluster client knows (masters and
    replicas), so a subscription lost with its node comes back on another.
    """

    def __init__(self, cluster: RedisCluster, url: str, config: Config) -> None:
        self._cluster = cluster
        self._target = parse_cluster_url(url)
        self._timeout = config.redis_timeout
        self._tries = 0

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Redis]:
        """A client on the next node; closed when the subscription ends."""
        nodes = self._cluster.get_nodes()
        if not nodes:  # the slot map is read on first use
            await self._cluster.initialize()
            nodes = self._cluster.get_nodes()
        node = nodes[self._tries % len(nodes)]
        self._tries += 1
        target = self._target
        client = Redis(
            host=node.host,
            port=int(node.port),
            username=target.username,
            password=target.password,
            **tls_kwargs(target.tls),
            socket_connect_timeout=self._timeout,
            socket_keepalive=True,
            health_check_interval=_HEALTH_CHECK_SECONDS,
        )
        try:
            yield client
        finally:
            await client.aclose(close_connection_pool=True)


def _sentinel_pool(target: SentinelURL, config: Config, options: dict[str, Any]) -> SentinelPool:
    sentinels = NewestSentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs={
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            **tls_kwargs(target.tls),
            "socket_timeout": config.redis_timeout,
            "socket_connect_timeout": config.redis_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError],
        },
    )
    pool = SentinelPool(  # type: ignore[no-untyped-call]
        target.master,
        sentinels,
        db=target.db,
        username=target.username,
        password=target.password,
        **tls_kwargs(target.tls),
        **options,
    )
    pool.sentinel_url = target
    return pool


def client_url(client: Redis) -> str:
    """The URL `client` was made for by `redis_client`, password masked."""
    pool = client.connection_pool
    if isinstance(pool, BufferCheckingPool):
        return pool.shown_url
    kwargs = pool.connection_kwargs
    return f"redis://{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
