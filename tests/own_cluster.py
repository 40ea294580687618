"""A Redis Cluster of the test's own: 3 masters (and optionally a replica each) on free ports.

Three masters, not one: a script may touch keys of other slots held by the *same* node
without an error, so a one-master cluster would hide every cross-slot mistake. The nodes
run without persistence and are always stopped (by PID) on the way out. With `tls`
(own_redis.ServerTLS) the nodes listen, and talk to each other on the cluster bus, over
TLS only; `url` is then a `rediss+cluster://` URL.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from asgi_worker import Config
from asgi_worker.backends.redis.clients import NodeSubscriber, close_client, store_client
from asgi_worker.backends.redis.events import EventListener
from asgi_worker.core.keys import RedisKeys

from .own_redis import OwnRedis, ServerTLS, wait_until

READY_SECONDS = 20.0
BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000


def _free_cluster_port(taken: set[int]) -> int:
    """A port free for the client and for its cluster bus (port + 10000).

    Neither may be one of `taken` (the other nodes' ports and bus ports, chosen but not
    yet bound); the ones returned are added to it.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + BUS_OFFSET >= 65536 or {port, port + BUS_OFFSET} & taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        taken.update((port, port + BUS_OFFSET))
        return port


class ClusterNode(OwnRedis):
    """One cluster-enabled redis-server."""

    def __init__(self, directory: Path, taken: set[int], tls: ServerTLS | None = None) -> None:
        super().__init__(directory, _free_cluster_port(taken), tls=tls)
        self.node_conf = directory / f"nodes-{self.port}.conf"

    def extra_arguments(self) -> list[str]:
        return [
            *(["--tls-cluster", "yes"] if self.tls else []),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.node_conf),
            "--cluster-node-timeout",
            "1000",
            # A replica may be promoted at once: the tests fail masters over on purpose.
            "--cluster-replica-validity-factor",
            "0",
            "--cluster-require-full-coverage",
            "no",
        ]


class OwnCluster:
    """Masters first, then their replicas; `url` is the `redis+cluster://` URL of all."""

    def __init__(
        self,
        directory: Path,
        masters: int = 3,
        replicas: int = 0,
        tls: ServerTLS | None = None,
    ) -> None:
        taken: set[int] = set()
        self.nodes = [ClusterNode(directory, taken, tls) for _ in range(masters * (1 + replicas))]
        self.replicas = replicas
        self.tls = tls
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        self.url = (
            f"rediss+cluster://{hosts}/?{tls.query()}" if tls else f"redis+cluster://{hosts}/"
        )

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        command = [
            *self._cli(),
            "--cluster",
            "create",
            *(f"127.0.0.1:{node.port}" for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        ]
        done = subprocess.run(command, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}")
        self.wait_ok()

    def wait_ok(self, within: float = READY_SECONDS) -> None:
        """Wait until every running node says `cluster_state:ok` and knows all slots."""
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                wait_until(
                    partial(_knows_every_slot, client),
                    f"cluster node {node.port} ok",
                    within=within,
                    step=0.05,
                )
            finally:
                client.close()

    def wait_settled(self, within: float = READY_SECONDS) -> None:
        """Wait until every running node says every slot's master is a running node.

        After a node is killed its slots stay assigned to it (and `cluster_state` may
        stay ok) until the others mark it failed and promote its replica.
        """
        running = {node.port for node in self.nodes if node.process is not None}
        wait_until(
            lambda: all(self._masters_seen(node) <= running for node in self.nodes if node.process),
            "the cluster settled",
            within=within,
            step=0.05,
        )
        self.wait_ok(within)

    @staticmethod
    def _masters_seen(node: ClusterNode) -> set[int]:
        client = node.client()
        try:
            return {int(entry[2][1]) for entry in client.execute_command("CLUSTER SLOTS")}
        except redis.RedisError:
            return {-1}  # not answering yet: not settled
        finally:
            client.close()

    def cli(self, *arguments: str, timeout: float = 60) -> str:
        """Run `redis-cli --cluster <arguments>` against the first running node."""
        node = next(node for node in self.nodes if node.process is not None)
        command = [
            *self._cli(),
            "--cluster",
            arguments[0],
            f"127.0.0.1:{node.port}",
            *arguments[1:],
        ]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            pytest.fail(f"{command} failed: {done.stdout!r} {done.stderr!r}")
        return done.stdout.decode(errors="replace")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _cli(self) -> list[str]:
        """`redis-cli`, with the CA and the client certificate if the nodes speak TLS."""
        binary = shutil.which("redis-cli")
        assert binary is not None, "redis-cli is not installed"
        if self.tls is None:
            return [binary]
        files = self.tls
        return [
            binary,
            "--tls",
            *("--cacert", str(files.ca)),
            *("--cert", str(files.client_cert)),
            *("--key", str(files.client_key)),
        ]


@contextmanager
def own_cluster(
    directory: Path, *, masters: int = 3, replicas: int = 0, tls: ServerTLS | None = None
) -> Iterator[OwnCluster]:
    """A started cluster for a test or a module; always stopped."""
    cluster = OwnCluster(directory, masters, replicas, tls)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class Heard:
    """Events an `EventListener` heard; `all` is set once `expected` of them came."""

    def __init__(self, expected: int) -> None:
        self.events: list[str] = []
        self.expected = expected
        self.all = asyncio.Event()

    def __call__(self, event: str) -> None:
        self.events.append(event)
        if len(self.events) >= self.expected:
            self.all.set()


@asynccontextmanager
async def cluster_listener(
    config: Config, expected: int
) -> AsyncIterator[tuple[EventListener, Heard, RedisCluster]]:
    """The web process's event listener on the Cluster of `config`, subscribed."""
    cluster = store_client(config.redis_url, config)
    assert isinstance(cluster, RedisCluster)
    heard = Heard(expected)
    listener = EventListener(
        NodeSubscriber(cluster, config.redis_url, config),
        RedisKeys(config.prefix).events(),
        on_event=heard,
        on_resync=lambda: None,
    )
    try:
        await listener.ready(2.0)
        assert listener.subscribed
        yield listener, heard, cluster
    finally:
        await listener.close()
        await close_client(cluster)


def _knows_every_slot(client: redis.Redis) -> bool:
    """Whether `client`'s node says `cluster_state:ok` and serves every slot."""
    info = client.execute_command("CLUSTER INFO")  # parsed into a dict
    return info.get("cluster_state") == "ok" and str(info.get("cluster_slots_ok")) == "16384"
