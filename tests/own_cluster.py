"""A Redis Cluster of the test's own: 3 masters (and optionally a replica each) on free ports.

Three masters, not one: a script may touch keys of other slots held by the *same* node
without an error, so a one-master cluster would hide every cross-slot mistake. The nodes
run without persistence and are always stopped (by PID) on the way out.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from .own_redis import OwnRedis

READY_SECONDS = 20.0
BUS_OFFSET = 10_000  # Redis Cluster's node-to-node bus listens on port + 10000


def _free_cluster_port() -> int:
    """A port free for the client and for its cluster bus (port + 10000)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + BUS_OFFSET >= 65536:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
            except OSError:
                continue
        return port


class ClusterNode(OwnRedis):
    """One cluster-enabled redis-server."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, _free_cluster_port())
        self.node_conf = directory / f"nodes-{self.port}.conf"

    def extra_arguments(self) -> list[str]:
        return [
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

    def __init__(self, directory: Path, masters: int = 3, replicas: int = 0) -> None:
        self.nodes = [ClusterNode(directory) for _ in range(masters * (1 + replicas))]
        self.replicas = replicas
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        self.url = f"redis+cluster://{hosts}/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        command = [
            _cli(),
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
        deadline = time.monotonic() + within
        for node in self.nodes:
            if node.process is None:
                continue
            client = node.client()
            try:
                while True:
                    try:
                        info = client.execute_command("CLUSTER INFO")  # parsed into a dict
                        if info.get("cluster_state") == "ok" and (
                            str(info.get("cluster_slots_ok")) == "16384"
                        ):
                            break
                    except redis.RedisError:
                        pass
                    if time.monotonic() > deadline:
                        pytest.fail(f"cluster node {node.port} not ok within {within} s")
                    time.sleep(0.05)
            finally:
                client.close()

    def cli(self, *arguments: str, timeout: float = 60) -> str:
        """Run `redis-cli --cluster <arguments>` against the first running node."""
        node = next(node for node in self.nodes if node.process is not None)
        command = [_cli(), "--cluster", arguments[0], f"127.0.0.1:{node.port}", *arguments[1:]]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            pytest.fail(f"{command} failed: {done.stdout!r} {done.stderr!r}")
        return done.stdout.decode(errors="replace")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _cli() -> str:
    binary = shutil.which("redis-cli")
    assert binary is not None, "redis-cli is not installed"
    return binary


@contextmanager
def own_cluster(directory: Path, *, masters: int = 3, replicas: int = 0) -> Iterator[OwnCluster]:
    """A started cluster for a test or a module; always stopped."""
    cluster = OwnCluster(directory, masters, replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
