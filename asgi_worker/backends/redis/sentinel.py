"""Following a Sentinel failover: `FailoverWatch`.

`FailoverWatch`: one per process (the web process's backend, the worker), started and
stopped with it. It listens on every Sentinel of the process's `redis+sentinel://` URLs;
when the master of one of them changes, it drops the connections of *every* pool it was
given at once, in use or idle. A demoted master keeps taking writes for seconds (until
Sentinel turns it into a replica, and throws them away then): a connection left open to
it would lose every write it carried. The next command on a dropped pool connects again,
and the pool asks the Sentinels where the master is now (`clients.NewestSentinel`).

It drops the pools at the first of:

- `+failover-state-wait-promotion`: the Sentinel doing a failover has just told a
  replica to become master. From then on the old master's writes are lost; Sentinel
  announces the switch only when the replica's next INFO shows it promoted, up to a
  second later (and a manual failover loses some 20 % more of its writes without this);
- `+switch-master`: the new configuration, announced by every Sentinel (a switch already
  acted on is not acted on again);
- `-failover-abort-*`: a failover given up after its promotion: back to the old master.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from asgi_worker.backends.redis.clients import SentinelPool, tls_kwargs
from asgi_worker.core.redis_urls import SentinelURL

logger = logging.getLogger("asgi_worker")

SWITCH_MASTER = "+switch-master"
"""The Sentinel channel that announces a new master: `<name> <old ip> <old port> <new ip>
<new port>`."""
PROMOTION = "+failover-state-wait-promotion"
"""The Sentinel channel that says a replica was told to become master: `slave <ip>:<port>
<ip> <port> @ <name> <master ip> <master port>`."""
ABORTED = "-failover-abort-*"
"""The pattern of the channels that say a failover was given up: `master <name> <ip>
<port>`."""

_RESUBSCRIBE_DELAY = 1.0


class FailoverWatch:
    """Drops every given pool's connections when Sentinel switches one of their masters.

    Pools that are not `redis+sentinel://` pools are dropped too (that is harmless: they
    connect again on their next command) but bring no Sentinel to listen to.
    """

    def __init__(self, pools: Iterable[ConnectionPool], *, connect_timeout: float) -> None:
        self._pools = list(dict.fromkeys(pools))  # a pool shared by two clients counts once
        self._connect_timeout = connect_timeout
        # Each Sentinel address once, with the URL (credentials, TLS) it came from and
        # the master names the process cares about there.
        self._sentinels: dict[tuple[str, int], tuple[SentinelURL, set[str]]] = {}
        for pool in self._pools:
            if isinstance(pool, SentinelPool):
                target = pool.sentinel_url
                for address in target.sentinels:
                    _, names = self._sentinels.setdefault(address, (target, set()))
                    names.add(target.master)
        self._switched_to: dict[str, str] = {}  # master name -> "host:port" dropped for
        self._promoting: set[str] = set()  # acted on a promotion not yet announced
        self._tasks: list[asyncio.Task[None]] = []
        self.switches = 0
        """How many switches dropped the pools (each is counted once, not per Sentinel)."""

    @classmethod
    def for_pools(cls, *pools: ConnectionPool, connect_timeout: float) -> FailoverWatch | None:
        """A watch over `pools`, or None if none of them is on Sentinel."""
        if not any(isinstance(pool, SentinelPool) for pool in pools):
            return None
        return cls(pools, connect_timeout=connect_timeout)

    @property
    def running(self) -> bool:
        """True once started, until stopped."""
        return bool(self._tasks)

    def start(self) -> None:
        """Subscribe on every Sentinel, in the background (needs a running event loop)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(
                self._listen(address, target, frozenset(names)),
                name=f"asgi-worker failover watch {address[0]}:{address[1]}",
            )
            for address, (target, names) in self._sentinels.items()
        ]

    async def stop(self) -> None:
        """Stop listening."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(
        self, address: tuple[str, int], target: SentinelURL, names: frozenset[str]
    ) -> None:
        host, port = address
        sentinel = Redis(
            host=host,
            port=port,
            username=target.sentinel_username,
            password=target.sentinel_password,
            **tls_kwargs(target.tls),
            # No read timeout: the subscription sits idle between failovers. Keepalives
            # find a dead Sentinel; the other Sentinels announce the switch too.
            socket_connect_timeout=self._connect_timeout,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        lost = False
        try:
            while True:
                try:
                    async with sentinel.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(SWITCH_MASTER, PROMOTION)
                        await pubsub.psubscribe(ABORTED)
                        if lost:
                            logger.warning("asgi-worker: Sentinel %s:%s is back", host, port)
                            lost = False
                        # A switch announced while we were not subscribed was missed.
                        await self._catch_up(names)
                        async for message in pubsub.listen():
                            await self._on_message(message, names)
                except (RedisError, OSError) as error:
                    if not lost:
                        logger.warning(
                            "asgi-worker: lost Sentinel %s:%s (%r); the other Sentinels "
                            "still announce failovers, retrying every %.0f s",
                            host,
                            port,
                            error,
                            _RESUBSCRIBE_DELAY,
                        )
                        lost = True
                    await asyncio.sleep(_RESUBSCRIBE_DELAY)
        finally:
            await sentinel.aclose(close_connection_pool=True)

    async def _on_message(self, message: dict[str, Any], names: frozenset[str]) -> None:
        channel, data = message.get("channel"), message.get("data")
        if not isinstance(channel, bytes) or not isinstance(data, bytes):
            return
        fields = data.decode("utf-8", "replace").split()
        if channel == SWITCH_MASTER.encode():
            # <name> <old ip> <old port> <new ip> <new port>
            if len(fields) == 5 and fields[0] in names:
                name, old_host, old_port, new_host, new_port = fields
                self._promoting.discard(name)
                await self._switch(name, f"{new_host}:{new_port}", f"from {old_host}:{old_port}")
        elif channel == PROMOTION.encode():
            # slave <ip>:<port> <ip> <port> @ <name> <master ip> <master port>
            if len(fields) == 8 and fields[4] == "@" and fields[5] in names:
                self._promoting.add(fields[5])
                await self._switch(fields[5], fields[1], f"from {fields[6]}:{fields[7]}, promoting")
        elif len(fields) >= 2 and fields[0] == "master" and fields[1] in self._promoting:
            # -failover-abort-...: master <name> <ip> <port>. Only an abort after the
            # promotion we followed matters: back to the master the Sentinels still name.
            self._promoting.discard(fields[1])
            self._switched_to.pop(fields[1], None)
            await self._drop(f"Sentinel gave up failing {fields[1]!r} over ({channel.decode()})")

    async def _switch(self, name: str, new: str, how: str) -> None:
        # Each Sentinel announces the switch, and the promotion came first: once is enough.
        if self._switched_to.get(name) == new:
            return
        self._switched_to[name] = new
        await self._drop(f"Sentinel switched {name!r} {how} to {new}")

    async def _catch_up(self, names: frozenset[str]) -> None:
        """Drop the pools if one is connected to a master the Sentinels no longer name."""
        for pool in self._pools:
            if not isinstance(pool, SentinelPool) or pool.service_name not in names:
                continue
            connected_to: Any = pool.master_address
            if connected_to is None:
                continue  # not connected yet: it will ask the Sentinels when it does
            try:
                current = await pool.sentinel_manager.discover_master(pool.service_name)
            except (RedisError, OSError):
                return  # no answer now; the subscription announces the next switch
            if tuple(current) != tuple(connected_to):
                now = f"{current[0]}:{current[1]}"
                self._switched_to[pool.service_name] = now
                await self._drop(f"the master of {pool.service_name!r} is now {now}")
                return

    async def _drop(self, why: str) -> None:
        results = await asyncio.gather(
            *(pool.disconnect() for pool in self._pools), return_exceptions=True
        )
        # Counted once every pool is dropped: a command sent after the count is seen goes
        # on a new connection, to the new master.
        self.switches += 1
        failed = [result for result in results if isinstance(result, BaseException)]
        logger.warning(
            "asgi-worker: %s; dropped the connections of %d pool(s)%s",
            why,
            len(self._pools),
            f" ({failed!r})" if failed else "",
        )
