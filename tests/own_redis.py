"""A `redis-server` of the test's own, on a free loopback port, to stop, crash and pause.

Tests that take Redis away never touch the shared Redis: they start their own with no
persistence (`--save '' --appendonly no`), so a restart really loses every key, and they
always stop it on the way out.

`ServerTLS` makes a server (and the Sentinels and Cluster nodes of own_sentinel.py and
own_cluster.py) speak TLS only, with certificates of a CA the test makes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

import pytest
import redis
import trustme

from .processes import free_port

READY_SECONDS = 10.0


def wait_until(
    ready: Callable[[], bool],
    what: str,
    *,
    within: float = READY_SECONDS,
    process: subprocess.Popen[bytes] | None = None,
    step: float = 0.02,
) -> None:
    """Poll `ready` until it is true; a Redis error counts as not yet.

    Fails the test naming `what` after `within` seconds, or at once if `process` (the
    server being waited for) has exited.
    """
    deadline = time.monotonic() + within
    while True:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the server exited with {process.returncode}")
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within} s")
        time.sleep(step)


def wait_answering(client: redis.Redis, what: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until `client`'s server answers PING (`wait_until`); closes `client`."""
    try:
        wait_until(lambda: bool(client.ping()), f"{what} answering", process=process)
    finally:
        client.close()


def server_binary() -> str:
    """The server to start: `redis-server`, or another (Valkey's) from `REDIS_SERVER`."""
    return os.environ.get("REDIS_SERVER", "redis-server")


@dataclass(frozen=True)
class ServerTLS:
    """TLS for a test's own servers: PEM files of a CA, a server and a client certificate.

    The server certificate names 127.0.0.1 and localhost. With `auth_clients` the
    servers refuse a client that shows no certificate of the CA (`tls-auth-clients yes`).
    """

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    auth_clients: bool = False

    @classmethod
    def make(cls, directory: Path, *, auth_clients: bool = False) -> ServerTLS:
        """Issue a new CA and its certificates (trustme) into `directory`."""
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("client.asgi-worker.test")
        files = cls(
            ca=directory / "ca.pem",
            cert=directory / "server.pem",
            key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
            auth_clients=auth_clients,
        )
        ca.cert_pem.write_to_path(str(files.ca))
        for issued, cert, key in (
            (server, files.cert, files.key),
            (client, files.client_cert, files.client_key),
        ):
            issued.cert_chain_pems[0].write_to_path(str(cert))
            issued.private_key_pem.write_to_path(str(key))
        return files

    def directives(self, port: int) -> list[tuple[str, str]]:
        """Server settings: TLS only, on `port` (replication and Sentinels' links too)."""
        return [
            ("port", "0"),
            ("tls-port", str(port)),
            ("tls-cert-file", str(self.cert)),
            ("tls-key-file", str(self.key)),
            ("tls-ca-cert-file", str(self.ca)),
            ("tls-auth-clients", "yes" if self.auth_clients else "no"),
            ("tls-replication", "yes"),
        ]

    def client_options(self, *, ca: bool = True, client_cert: bool = True) -> dict[str, str]:
        """redis-py's TLS parameters for these servers: the CA, the client certificate."""
        options = {"ssl_ca_certs": str(self.ca)} if ca else {}
        if client_cert:
            options.update(ssl_certfile=str(self.client_cert), ssl_keyfile=str(self.client_key))
        return options

    def query(self, *, ca: bool = True, client_cert: bool = True, **more: str) -> str:
        """`client_options` (`more` added or replacing) as a URL query, without the `?`."""
        options = {**self.client_options(ca=ca, client_cert=client_cert), **more}
        return urlencode(options, safe="/")


def listen_arguments(port: int, tls: ServerTLS | None) -> list[str]:
    """redis-server's arguments to listen on `port`: plain, or TLS only with `tls`."""
    if tls is None:
        return ["--port", str(port)]
    return [part for name, value in tls.directives(port) for part in (f"--{name}", value)]


def probe_client(port: int, tls: ServerTLS | None, timeout: float) -> redis.Redis:
    """A client of the test's own on 127.0.0.1:`port` (with `tls`, its client certificate)."""
    options: dict[str, Any] = {"ssl": True, **tls.client_options()} if tls else {}
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        **options,
    )


class OwnRedis:
    """One redis-server process at a time, always on the same port (TLS only with `tls`)."""

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        tls: ServerTLS | None = None,
        arguments: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.tls = tls
        self.arguments = arguments
        """More redis-server arguments (`--maxmemory-policy noeviction`, ...)."""
        self.url = (
            f"rediss://127.0.0.1:{self.port}/0?{tls.query()}"
            if tls
            else f"redis://127.0.0.1:{self.port}/0"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False
        self.starts = 0

    def start(self) -> None:
        """Start redis-server on `port` and wait until it answers PING."""
        assert self.process is None, "already running"
        binary = shutil.which(server_binary())
        assert binary is not None, f"{server_binary()} is not installed"
        self.starts += 1
        self._log = (self.directory / f"redis-{self.port}-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                *listen_arguments(self.port, self.tls),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra_arguments(),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        client = probe_client(self.port, self.tls, 0.5)
        wait_answering(client, f"redis-server on port {self.port}", self.process)

    def extra_arguments(self) -> list[str]:
        """More redis-server arguments: `arguments`, and a cluster node's (own_cluster.py)."""
        return list(self.arguments)

    def kill(self) -> None:
        """Crash it (SIGKILL): every key is gone, and connections drop."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """Stop it (SIGTERM, no save configured); SIGKILL if it lingers."""
        self._end(signal.SIGTERM)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self._paused = False

    def client(self) -> redis.Redis:
        return probe_client(self.port, self.tls, 2)

    def _end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self._paused:
            process.send_signal(signal.SIGCONT)
            self._paused = False
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


@contextmanager
def own_redis(
    directory: Path,
    *,
    started: bool = True,
    tls: ServerTLS | None = None,
    arguments: tuple[str, ...] = (),
) -> Iterator[OwnRedis]:
    """A redis-server for one test (started unless `started=False`); always stopped."""
    server = OwnRedis(directory, tls=tls, arguments=arguments)
    try:
        if started:
            server.start()
        yield server
    finally:
        server.stop()
