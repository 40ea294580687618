"""End to end: uvicorn and `asgi-worker worker` as real subprocesses, real Redis, real HTTP.

Each test gets its own key prefix (so its own arq queue), starts both processes with
`tests/e2e_app.py`, and talks HTTP to uvicorn. The app counts every run of an endpoint in
Redis, so "the endpoint ran exactly once" is checked across both processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis

from .processes import asgi_worker_command, free_port, http_client, processes
from .stack import APP, HIT, MISS, REDIS_URL, environment

pytestmark = pytest.mark.e2e

READY_SECONDS = 15.0


@dataclass
class Server:
    """The two running processes of one test and how to reach them."""

    base_url: str
    prefix: str
    web: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    redis: Redis

    def runs(self, path: str) -> int:
        """How many times the endpoint at `path` ran, in either process (see e2e_app)."""
        value = self.redis.get(f"{self.prefix}:runs:{path}")
        return 0 if value is None else int(value)

    def client(self, connections: int = 10) -> httpx.AsyncClient:
        return http_client(self.base_url, connections)


@pytest.fixture
def server(prefix: str, tmp_path: Path) -> Iterator[Server]:
    """uvicorn and the worker for this test; both stopped and the keys deleted afterwards."""
    port = free_port()
    redis = Redis.from_url(REDIS_URL)
    redis.ping()
    try:
        with processes(tmp_path, environment(prefix)) as group:
            web = group.start(
                "uvicorn",
                [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1", "--port", str(port)],
            )
            worker = group.start("worker", asgi_worker_command("worker", APP))
            base_url = f"http://127.0.0.1:{port}"
            group.wait_for(
                "uvicorn",
                lambda: httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200,
            )
            # arq writes its health-check key on its first poll, after on_startup (the
            # app's lifespan) has finished: from then on it takes jobs.
            group.wait_for("worker", lambda: bool(redis.exists(f"{prefix}:queue:health-check")))
            yield Server(base_url, prefix, web, worker, redis)
    finally:
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            for key in redis.scan_iter(match=pattern, count=1000):
                redis.delete(key)
        redis.close()


async def _get_until_ready(http: httpx.AsyncClient, url: str) -> httpx.Response:
    """GET until the worker's response is served; every answer before it must be a 202."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        response = await http.get(url)
        if response.status_code != 202:
            return response
        assert response.headers["cache-status"] == MISS
        await asyncio.sleep(0.05)
    pytest.fail(f"{url} still 202 after {READY_SECONDS}s")


def _assert_accepted(response: httpx.Response) -> None:
    assert response.status_code == 202
    assert response.headers["retry-after"] == "1"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["cache-status"] == MISS
    assert response.content == b""


async def test_concurrent_cold_gets_run_the_endpoint_once(server: Server) -> None:
    url = "/slow?report=q1"
    async with server.client(connections=250) as http:
        cold = await asyncio.gather(*(http.get(url) for _ in range(200)))
        statuses = Counter(response.status_code for response in cold)
        assert set(statuses) <= {200, 202}, statuses
        assert statuses[202] >= 1, statuses  # the endpoint sleeps; the first ones must miss
        for response in cold:
            if response.status_code == 202:
                _assert_accepted(response)

        ready = await _get_until_ready(http, url)
        assert ready.status_code == 200
        assert ready.headers["cache-status"] == HIT
        # The body was made in the worker process, by the first and only run.
        assert ready.json() == {
            "path": "/slow",
            "query": "report=q1",
            "pid": server.worker.pid,
            "run": 1,
        }
        assert server.runs("/slow") == 1

        later = await asyncio.gather(*(http.get(url) for _ in range(50)))
    for response in later:
        assert response.status_code == 200
        assert response.content == ready.content
        assert response.headers["cache-status"] == HIT
        assert response.headers["x-app"] == "slow"
        assert response.headers["content-type"] == "application/json"
        assert response.headers["content-length"] == str(len(ready.content))
        assert 0 <= int(response.headers["age"]) <= 60
    for response in cold:
        if response.status_code == 200:
            assert response.content == ready.content
    assert server.runs("/slow") == 1


async def test_post_passes_straight_to_the_app(server: Server) -> None:
    async with server.client() as http:
        for number in (1, 2, 3):
            response = await http.post("/items", content=f"item-{number}")
            assert response.status_code == 201
            assert "cache-status" not in response.headers
            assert response.json() == {
                "received": f"item-{number}",
                "pid": server.web.pid,  # ran in the web process, not in the worker
                "run": number,
            }
    assert server.runs("/items") == 3


async def test_credentials_pass_straight_to_the_app(server: Server) -> None:
    async with server.client() as http:
        bearer = await http.get("/whoami", headers={"Authorization": "Bearer x"})
        assert bearer.status_code == 200
        assert "cache-status" not in bearer.headers
        assert "age" not in bearer.headers
        assert bearer.json() == {
            "authorization": "Bearer x",
            "cookie": None,
            "pid": server.web.pid,
            "run": 1,
        }

        cookie = await http.get("/whoami", headers={"Cookie": "session=abc"})
        assert cookie.status_code == 200
        assert "cache-status" not in cookie.headers
        assert cookie.json() == {
            "authorization": None,
            "cookie": "session=abc",
            "pid": server.web.pid,
            "run": 2,
        }
        assert server.runs("/whoami") == 2

        # Neither answer was stored: the same URL without credentials is a cold miss, and
        # the worker's replay of it carries no credentials.
        anonymous = await http.get("/whoami")
        _assert_accepted(anonymous)
        stored = await _get_until_ready(http, "/whoami")
    assert stored.status_code == 200
    assert stored.headers["cache-status"] == HIT
    assert stored.json() == {
        "authorization": None,
        "cookie": None,
        "pid": server.worker.pid,
        "run": 3,
    }
    assert server.runs("/whoami") == 3


async def test_head_is_served_from_the_get_entry(server: Server) -> None:
    url = "/slow?report=head"
    async with server.client() as http:
        cold = await http.head(url)
        _assert_accepted(cold)  # a HEAD miss claims and enqueues the GET replay

        got = await _get_until_ready(http, url)
        assert got.status_code == 200
        assert got.headers["cache-status"] == HIT

        head = await http.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["cache-status"] == HIT
    assert head.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == got.headers["content-length"]
    assert head.headers["content-length"] == str(len(got.content))
    assert int(got.headers["content-length"]) > 0
    assert server.runs("/slow") == 1
