"""uvicorn + `asgi-worker worker` subprocesses on `tests/e2e_app.py`, with settings per test.

Like the `server` fixture of `tests/test_e2e.py`, but the test chooses the `ASGI_WORKER_*`
settings, may start, kill and restart workers, and may pass uvicorn extra arguments.
Everything is stopped, and this test's keys (only those) deleted, on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from .e2e_app import runs_by_url_key, runs_key
from .processes import (
    STARTUP_SECONDS,
    Processes,
    asgi_worker_command,
    free_port,
    http_client,
    processes,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
APP = "tests.e2e_app:app"
HIT = "asgi-worker; hit"
MISS = "asgi-worker; fwd=uri-miss"


def environment(
    prefix: str, redis_url: str = REDIS_URL, counts_url: str | None = None, **settings: str
) -> dict[str, str]:
    """The variables both processes get; `settings` are `ASGI_WORKER_<NAME>` values.

    e2e_app counts runs on `counts_url`, by default the cache's Redis.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    env.update(
        ASGI_WORKER_REDIS_URL=redis_url,
        ASGI_WORKER_PREFIX=prefix,
        ASGI_WORKER_TTL="60",
        ASGI_WORKER_RETRY_AFTER="1",
        ASGI_WORKER_EXCLUDE="/health",
        PYTHONUNBUFFERED="1",
        AW_E2E_COUNTS_URL=counts_url or redis_url,  # where e2e_app counts runs
    )
    env.update({f"ASGI_WORKER_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class Stack:
    """The running processes of one test and how to reach them."""

    group: Processes
    base_url: str
    prefix: str
    redis: Redis
    web: subprocess.Popen[bytes]
    counts: Redis
    """Where e2e_app counts runs (`running_stack`'s `counts_url`)."""
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def worker(self) -> subprocess.Popen[bytes]:
        """The most recently started worker."""
        return self.workers[-1]

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start one more worker and wait until it takes jobs."""
        # arq writes its health-check key on its first poll, after on_startup (the app's
        # lifespan) has finished. A killed worker leaves its key behind: delete it first.
        health = f"{self.prefix}:queue:health-check"
        self.redis.delete(health)
        process = self.group.start(
            f"worker{len(self.workers) + 1}", asgi_worker_command("worker", APP)
        )
        self.workers.append(process)
        # Not Processes.wait_for: it fails on any exited process, and a test may have
        # killed an earlier worker on purpose.
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self.redis.exists(health):
            for candidate in (self.web, process):
                if candidate.poll() is not None:
                    pytest.fail(
                        f"{candidate.args!r} exited with {candidate.returncode}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready after {STARTUP_SECONDS}s\n{self.logs()}")
            time.sleep(0.05)
        return process

    def runs(self, path: str) -> int:
        """How many times the endpoint at `path` ran, in any process (see e2e_app)."""
        value = self.counts.get(runs_key(self.prefix, path))
        return 0 if value is None else int(value)

    def runs_by_url(self) -> dict[str, int]:
        """How many times `/hang` ran, per `path?query`."""
        raw = self.counts.hgetall(runs_by_url_key(self.prefix))
        return {key.decode(): int(value) for key, value in raw.items()}

    def queued(self) -> int:
        """Jobs waiting in this test's arq queue."""
        return int(self.redis.zcard(f"{self.prefix}:queue"))

    def client(self, connections: int = 10) -> httpx.AsyncClient:
        return http_client(self.base_url, connections)

    def logs(self) -> str:
        return self.group.logs()


@contextmanager
def running_stack(
    prefix: str,
    directory: Path,
    *,
    uvicorn_args: tuple[str, ...] = (),
    worker: bool = True,
    redis_url: str = REDIS_URL,
    counts_url: str | None = None,
    **settings: str,
) -> Iterator[Stack]:
    """uvicorn (and a worker, unless `worker=False`) for one test; see `environment`."""
    port = free_port()
    redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    redis.ping()
    counts = redis if counts_url is None else Redis.from_url(counts_url, socket_timeout=5)
    env = environment(prefix, redis_url, counts_url, **settings)
    try:
        with processes(directory, env) as group:
            command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1"]
            web = group.start("uvicorn", [*command, "--port", str(port), *uvicorn_args])
            base_url = f"http://127.0.0.1:{port}"
            group.wait_for(
                "uvicorn",
                lambda: httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200,
            )
            stack = Stack(group, base_url, prefix, redis, web, counts)
            if worker:
                stack.start_worker()
            yield stack
    finally:
        for client in dict.fromkeys((redis, counts)):
            with contextlib.suppress(RedisError):  # a test may have taken its own Redis away
                for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
                    for key in client.scan_iter(match=pattern, count=1000):
                        client.delete(key)
            client.close()


async def get_until_ready(
    http: httpx.AsyncClient,
    url: str,
    *,
    within: float,
    interval: float = 0.05,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """GET until something other than a 202 comes; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        response = await http.get(url, headers=headers)
        if response.status_code != 202:
            return response
        assert response.headers["cache-status"] == MISS
        if time.monotonic() > deadline:
            pytest.fail(f"{url} still 202 after {within}s")
        await asyncio.sleep(interval)


def wait_until(what: str, ready: Callable[[], bool], *, within: float, stack: Stack) -> None:
    """Poll `ready` until true; fail with the processes' logs after `within` seconds."""
    deadline = time.monotonic() + within
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within}s\n{stack.logs()}")
        time.sleep(0.02)
