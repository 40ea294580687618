"""uvicorn and `asgi-worker worker` on `tests/dashboard_app.py`, for the dashboard's tests."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError

from asgi_worker.core.keys import RedisKeys
from asgi_worker.core.progress import Progress

from . import stack
from .processes import Processes, asgi_worker_command, free_port, processes

APP = "tests.dashboard_app:app"
TOKEN = "dashboard-test-token-6f1c"


def environment(prefix: str) -> dict[str, str]:
    """The variables of every process: the cache under `prefix`, counts on, the token."""
    return stack.environment(
        prefix, exclude="/health,/ops*", dashboard_counts="1", dashboard_token=TOKEN
    )


@dataclass
class DashboardStack:
    """The running processes of one test and how to reach them."""

    group: Processes
    base_url: str
    prefix: str
    redis: Redis

    @property
    def keys(self) -> RedisKeys:
        return RedisKeys(self.prefix)

    def state(self, http: httpx.Client) -> dict[str, Any]:
        """The dashboard's JSON, read with the bearer token."""
        response = http.get("/ops/api/state", headers={"authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def report(self, job_id: str, progress: Progress) -> None:
        """Write a job's progress hash as a worker reports it."""
        key = self.keys.progress(job_id)
        self.redis.delete(key)
        self.redis.hset(key, mapping=progress.fields())  # type: ignore[arg-type]
        self.redis.expire(key, 60)

    def stored(self) -> set[bytes]:
        """The keys of the responses stored now."""
        return set(self.redis.scan_iter(match=f"{self.prefix}:{{*}}*:resp", count=1000))

    def logs(self) -> str:
        return self.group.logs()


def wait_for(what: str, ready: Any, stack: DashboardStack, within: float = 15.0) -> Any:
    """Poll `ready()` until it returns something true, and return that."""
    deadline = time.monotonic() + within
    while True:
        found = ready()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within}s\n{stack.logs()}")
        time.sleep(0.1)


def get_until_stored(http: httpx.Client, url: str, stack: DashboardStack) -> httpx.Response:
    """GET `url` until the cache serves it (the first answers are 202s)."""
    responses: list[httpx.Response] = []

    def served() -> bool:
        responses.append(http.get(url))
        return responses[-1].status_code == 200

    wait_for(f"{url} stored", served, stack)
    return responses[-1]


@contextmanager
def dashboard_stack(
    prefix: str, directory: Path, *, worker: bool = True
) -> Iterator[DashboardStack]:
    """uvicorn and (unless `worker=False`) one worker; this test's keys deleted after."""
    port = free_port()
    redis = Redis.from_url(stack.REDIS_URL, socket_timeout=5)
    redis.ping()
    env = environment(prefix)
    try:
        with processes(directory, env) as group:
            command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1"]
            group.start("uvicorn", [*command, "--port", str(port)])
            base_url = f"http://127.0.0.1:{port}"
            group.wait_for(
                "uvicorn", lambda: httpx.get(f"{base_url}/health", timeout=1).status_code == 200
            )
            if worker:
                group.start("worker", asgi_worker_command("worker", APP))
                health = f"{prefix}:queue:health-check"
                group.wait_for("worker", lambda: bool(redis.exists(health)))
            yield DashboardStack(group, base_url, prefix, redis)
    finally:
        with contextlib.suppress(RedisError):
            for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
                for key in redis.scan_iter(match=pattern, count=1000):
                    redis.delete(key)
        redis.close()
