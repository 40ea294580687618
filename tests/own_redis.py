"""A `redis-server` of the test's own, on a free loopback port, to stop, crash and pause.

Tests that take Redis away never touch the shared Redis: they start their own with no
persistence (`--save '' --appendonly no`), so a restart really loses every key, and they
always stop it on the way out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
import redis

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


class OwnRedis:
    """One redis-server process at a time, always on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
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
                "--port",
                str(self.port),
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
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        wait_answering(client, f"redis-server on port {self.port}", self.process)

    def extra_arguments(self) -> list[str]:
        """More redis-server arguments (a cluster node's, see own_cluster.py)."""
        return []

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
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

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
def own_redis(directory: Path, *, started: bool = True) -> Iterator[OwnRedis]:
    """A redis-server for one test (started unless `started=False`); always stopped."""
    server = OwnRedis(directory)
    try:
        if started:
            server.start()
        yield server
    finally:
        server.stop()
