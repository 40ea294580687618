"""A Sentinel topology of the test's own: a master, a replica and three Sentinels.

Every process runs on a free loopback port with no persistence, is stopped by its PID
(never by name), and writes its log into the test's directory. Sentinels notice a dead
master after `down_after_ms` (1 s here; 30 s is Sentinel's default), so a failover takes
seconds. The shared Redis on 6379 is never touched.

With `tls` (own_redis.ServerTLS) every node and Sentinel listens on TLS only, and
they talk to each other over TLS too; `url` is then a `rediss+sentinel://` URL.

Which node is master changes as tests fail over and kill: `wait_healthy()` brings the
topology back to one master, one replica in sync and three Sentinels that agree, whatever
the previous test left (a killed node is started again as a replica of the current master).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import redis

from .own_redis import (
    ServerTLS,
    listen_arguments,
    probe_client,
    server_binary,
    wait_answering,
    wait_until,
)
from .processes import free_port

MASTER_NAME = "mymaster"
READY_SECONDS = 30.0
HOST = "127.0.0.1"


def _binary() -> str:
    found = shutil.which(server_binary())
    assert found is not None, f"{server_binary()} is not installed"
    return found


class _Process:
    """One redis-server (a data node or a Sentinel), started and stopped by PID."""

    def __init__(self, directory: Path, name: str, port: int, tls: ServerTLS | None = None) -> None:
        self.directory = directory
        self.name = name
        self.port = port
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, arguments: list[str]) -> None:
        assert self.process is None, f"{self.name} already running"
        self.starts += 1
        self._log = (self.directory / f"{self.name}-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [_binary(), *arguments], stdout=self._log, stderr=subprocess.STDOUT
        )

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return probe_client(self.port, self.tls, timeout)

    def wait_answering(self) -> None:
        assert self.process is not None
        wait_answering(self.client(0.5), f"{self.name} on port {self.port}", self.process)

    def kill(self) -> None:
        """SIGKILL: no goodbye to anyone, connections just drop."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(how)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


class Node(_Process):
    """A data node: master or replica, as Sentinel decides."""

    def start(self, replica_of: tuple[str, int] | None = None) -> None:
        arguments = [
            *listen_arguments(self.port, self.tls),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--dbfilename",
            f"{self.name}.rdb",
            # Redis waits 5 s by default before a diskless full sync, for more replicas.
            "--repl-diskless-sync-delay",
            "0",
        ]
        if replica_of is not None:
            arguments += ["--replicaof", replica_of[0], str(replica_of[1])]
        self._spawn(arguments)
        self.wait_answering()

    def role(self) -> str:
        # Sentinel ends a reconfiguration with CLIENT KILL TYPE normal: a poll that meets
        # it is asked again (once) rather than failing the test.
        try:
            role: Any = self._role()
        except redis.ConnectionError:
            role = self._role()
        kind = role[0]
        return kind.decode() if isinstance(kind, bytes) else str(kind)

    def _role(self) -> Any:
        with self.client() as client:
            return client.execute_command("ROLE")


class SentinelProcess(_Process):
    """One Sentinel, its config file in the test directory (Sentinel rewrites it)."""

    def start(
        self, master: tuple[str, int], *, down_after_ms: int, failover_timeout_ms: int
    ) -> None:
        config = self.directory / f"{self.name}.conf"
        listen = self.tls.directives(self.port) if self.tls else [("port", str(self.port))]
        config.write_text(
            "".join(f"{name} {value}\n" for name, value in listen) + f"bind {HOST}\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {MASTER_NAME} {master[0]} {master[1]} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._spawn([str(config), "--sentinel"])
        self.wait_answering()
        with self.client() as client:
            # Sentinel's own periods (Redis 7's SENTINEL DEBUG), shortened so that the
            # topology heals in seconds between tests: INFO from each node every 1 s
            # (10 s by default), hellos every 0.5 s (2 s), which also cuts the wait
            # before a demoted master is turned into a replica from 8 s to 2 s. Failure
            # detection (down-after, the 1 s ping period) and elections keep their pace.
            client.execute_command("SENTINEL", "DEBUG", "info-period", 1000, "publish-period", 500)

    def master_state(self) -> dict[str, Any]:
        with self.client() as client:
            state: dict[str, Any] = client.sentinel_master(MASTER_NAME)
        return state

    def replicas(self) -> list[dict[str, Any]]:
        with self.client() as client:
            replicas: list[dict[str, Any]] = client.sentinel_slaves(MASTER_NAME)
        return replicas


class Topology:
    """Two data nodes and three Sentinels; see the module doc."""

    def __init__(
        self,
        directory: Path,
        *,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        tls: ServerTLS | None = None,
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.tls = tls
        self.nodes = [Node(directory, f"node{i}", free_port(), tls) for i in (1, 2)]
        self.sentinels = [
            SentinelProcess(directory, f"sentinel{i}", free_port(), tls) for i in (1, 2, 3)
        ]

    @property
    def url(self) -> str:
        """The `redis+sentinel://` URL of db 0 of the master (`rediss+sentinel://` with
        TLS, with the CA and the client certificate)."""
        return self.url_with()

    def url_with(self, query: str | None = None) -> str:
        """`url` with the query `query` (by default, with TLS, the CA and client cert)."""
        hosts = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        if query is None:
            query = self.tls.query() if self.tls else ""
        return f"{scheme}://{hosts}/{MASTER_NAME}/0" + (f"?{query}" if query else "")

    def start(self) -> None:
        first, second = self.nodes
        first.start()
        second.start(replica_of=first.address)
        self._wait(lambda: self._in_sync(first), "the replica in sync")
        for sentinel in self.sentinels:
            sentinel.start(
                first.address,
                down_after_ms=self.down_after_ms,
                failover_timeout_ms=self.failover_timeout_ms,
            )
        self.wait_healthy()

    def stop(self) -> None:
        for process in (*self.sentinels, *self.nodes):
            process.stop()

    def node_at(self, address: tuple[str, int]) -> Node:
        return next(node for node in self.nodes if node.address == address)

    def master(self) -> Node:
        """The node the Sentinels agree is master (fails if they do not agree)."""
        addresses = {self._named(sentinel) for sentinel in self.sentinels}
        assert len(addresses) == 1, f"the Sentinels disagree: {addresses}"
        return self.node_at(addresses.pop())

    def replica(self) -> Node:
        master = self.master()
        return next(node for node in self.nodes if node is not master)

    def wait_healthy(self) -> None:
        """One master, its replica in sync, three Sentinels agreeing and seeing all."""
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                master = self.master()
                break
            except (AssertionError, redis.RedisError, StopIteration):
                if time.monotonic() > deadline:
                    pytest.fail(f"the Sentinels never agreed on a master\n{self.logs()}")
                time.sleep(0.1)
        for node in self.nodes:
            if not node.running:
                node.start(replica_of=master.address)  # a node a test killed
        self._wait(lambda: self._healthy(master), "a healthy topology")

    def failover(self) -> tuple[str, int]:
        """`SENTINEL FAILOVER` (a manual one, as for maintenance); returns the old master."""
        old = self.master().address
        with self.sentinels[0].client(2.0) as client:
            client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return old

    def wait_switched(self, old: tuple[str, int], within: float = 20.0) -> Node:
        """Wait until every Sentinel names a master other than `old`; return it."""
        deadline = time.monotonic() + within
        while True:
            try:
                named = {self._named(sentinel) for sentinel in self.sentinels}
            except redis.RedisError:
                named = set()
            if len(named) == 1 and old not in named:
                return self.node_at(named.pop())
            if time.monotonic() > deadline:
                pytest.fail(f"no switch away from {old} within {within}s\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.directory.glob("*.log")):
            if path.name.startswith(("node", "sentinel")):
                text = path.read_text(errors="replace")[-4000:]
                parts.append(f"----- {path.name} -----\n{text}")
        return "\n".join(parts)

    def _named(self, sentinel: SentinelProcess) -> tuple[str, int]:
        state = sentinel.master_state()
        return str(state["ip"]), int(state["port"])

    def _in_sync(self, master: Node) -> bool:
        with master.client() as client:
            info = client.info("replication")
        replicas = [value for key, value in info.items() if key.startswith("slave")]
        return (
            info.get("role") == "master"
            and len(replicas) == len(self.nodes) - 1
            and all(replica.get("state") == "online" for replica in replicas)
        )

    def _healthy(self, master: Node) -> bool:
        if not self._in_sync(master):
            return False
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if (str(state["ip"]), int(state["port"])) != master.address:
                return False
            if state["flags"] != "master" or state["num-other-sentinels"] != 2:
                return False
            replicas = sentinel.replicas()
            good = [
                replica
                for replica in replicas
                if replica["flags"] == "slave" and replica["master-link-status"] == "ok"
            ]
            if len(good) != len(self.nodes) - 1:
                return False
        return True

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        try:
            wait_until(ready, what, within=READY_SECONDS, step=0.05)
        except pytest.fail.Exception:
            print(self.logs())  # the servers' logs, shown with the failure
            raise


@contextmanager
def own_sentinel(directory: Path, **options: Any) -> Iterator[Topology]:
    """A started topology; every process stopped on the way out."""
    topology = Topology(directory, **options)
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
