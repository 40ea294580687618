"""End to end, per framework: a real server, `asgi-worker worker`, real Redis, real HTTP.

Each test serves one app of `tests/e2e_framework_apps.py` (`<framework>_app`, behind
`WorkerMiddleware` placed as that framework's users place it) and, in a second server of the
same kind, its bare copy (`<framework>_bare`, the same endpoints without the middleware).
The worker is `asgi-worker worker tests.e2e_framework_apps:<framework>_app` with no
`--config` and no `ASGI_WORKER_*` variable (those would win over the app's Config): it has
to find the Config inside the app it is given. The apps build theirs from `AW_E2E_*`.

Every URL must first answer 202, then, once the worker has stored it, exactly what the bare
app answers: status, body bytes and headers, except those a cache or a server adds or
rewrites (`IGNORED`). The test process never imports the apps module (it configures
Django's settings at import), hence the second server rather than an in-process copy.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from redis import Redis

from .processes import asgi_worker_command, free_port, processes
from .stack import HIT, MISS, REDIS_URL

pytestmark = pytest.mark.e2e

MODULE = "tests.e2e_framework_apps"
READY_SECONDS = 15.0

# What the apps send (kept in step with tests/e2e_framework_apps.py, which this process
# must not import).
QUERY = "héllo wörld ✓ 日本語 & 100%"
GREETING = "set at startup ✓"
BINARY = bytes(range(256)) * 64
STREAMED = b"".join(f"chunk {number}: ✓\n".encode() for number in range(5))

JSON = "/json?" + urlencode({"q": QUERY})
COMMON = (JSON, "/binary", "/items/1", "/items/999", "/stream")
# Django has no lifespan (so no /state), and a sync view of some endpoints.
DJANGO = (*COMMON, "/sync/json?" + urlencode({"q": QUERY}), "/sync/items/999", "/sync/stream")

# Added by the cache (age, cache-status, an etag when the app sent none), made exact from
# the stored body (content-length), or by the server per connection (date, server, and the
# hop-by-hop headers a streamed response gets instead of a length; never stored).
IGNORED = frozenset(
    {
        "date",
        "server",
        "age",
        "cache-status",
        "etag",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
    }
)


@dataclass(frozen=True)
class Case:
    framework: str
    server: str
    paths: tuple[str, ...] = (*COMMON, "/state")

    @property
    def id(self) -> str:
        return f"{self.framework}-{self.server}"


CASES = [
    Case("fastapi", "uvicorn"),
    Case("starlette", "uvicorn"),
    Case("starlette", "hypercorn"),
    Case("litestar", "uvicorn"),
    Case("quart", "uvicorn"),
    Case("django", "uvicorn", DJANGO),
]


@dataclass
class Running:
    served: str
    bare: str


def _environment(prefix: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ASGI_") and name != "DJANGO_SETTINGS_MODULE"
    }
    # The apps' Config (see e2e_framework_apps); no ASGI_WORKER_* variable at all.
    env.update(AW_E2E_REDIS_URL=REDIS_URL, AW_E2E_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return env


def _server_command(server: str, app: str, port: int) -> list[str]:
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}"]


def _healthy(base_url: str) -> bool:
    return httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200


@contextmanager
def _running(case: Case, prefix: str, directory: Path) -> Iterator[Running]:
    """The served app, its bare copy and the worker; all stopped, our keys deleted, after."""
    served_port, bare_port = free_port(), free_port()
    redis = Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    redis.ping()
    try:
        with processes(directory, _environment(prefix)) as group:
            app = f"{MODULE}:{case.framework}_app"
            group.start(case.server, _server_command(case.server, app, served_port))
            bare = f"{MODULE}:{case.framework}_bare"
            group.start(f"{case.server}-bare", _server_command(case.server, bare, bare_port))
            group.start("worker", asgi_worker_command("worker", app))
            served_url = f"http://127.0.0.1:{served_port}"
            bare_url = f"http://127.0.0.1:{bare_port}"
            group.wait_for(case.server, lambda: _healthy(served_url))
            group.wait_for(f"{case.server}-bare", lambda: _healthy(bare_url))

            # arq writes its health-check key on its first poll, after on_startup (the
            # app's lifespan): from then on it takes jobs from the queue of the app's Config.
            # (A worker that missed that Config polls another queue: "not ready" and its log.)
            health = f"{prefix}:queue:health-check"
            group.wait_for("worker", lambda: bool(redis.exists(health)))
            yield Running(served_url, bare_url)
    finally:
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            for key in redis.scan_iter(match=pattern, count=1000):
                redis.delete(key)
        redis.close()


async def _get_when_ready(http: httpx.AsyncClient, paths: tuple[str, ...]) -> list[httpx.Response]:
    """GET each path until the worker's response is served; every answer before is a 202."""
    ready: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + READY_SECONDS
    while True:
        pending = [path for path in paths if path not in ready]
        responses = await asyncio.gather(*(http.get(path) for path in pending))
        for path, response in zip(pending, responses, strict=True):
            if response.status_code != 202:
                ready[path] = response
            else:
                assert response.headers["cache-status"] == MISS, path
        if len(ready) == len(paths):
            return [ready[path] for path in paths]
        if time.monotonic() > deadline:
            waiting = [path for path in paths if path not in ready]
            pytest.fail(f"still 202 after {READY_SECONDS}s: {waiting}")
        await asyncio.sleep(0.05)


def _compared_headers(response: httpx.Response) -> list[tuple[str, str]]:
    return sorted(
        (name, value) for name, value in response.headers.multi_items() if name not in IGNORED
    )


def _check_content(path: str, response: httpx.Response) -> None:
    """What each endpoint must answer, so that equal-to-bare also means correct."""
    if path.startswith(("/json", "/sync/json")):
        assert response.status_code == 200
        assert response.json()["q"] == QUERY
        assert response.headers["content-type"].startswith("application/json")
        assert "x-e2e-framework" in response.headers
    elif path == "/binary":
        assert response.status_code == 200
        assert response.content == BINARY
    elif path == "/items/1":
        assert response.status_code == 200
        assert response.json() == {"id": 1, "name": "widget ✓"}
    elif path.endswith("/items/999"):
        assert response.status_code == 404
    elif path.endswith("/stream"):
        assert response.status_code == 200
        assert response.content == STREAMED
        assert "content-length" not in response.headers  # really streamed: no length known
    elif path == "/state":
        assert response.status_code == 200
        assert response.json() == {"greeting": GREETING}
    else:  # pragma: no cover - a path without a check is a mistake in this file
        raise AssertionError(path)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_stored_response_is_the_apps_own(case: Case, prefix: str, tmp_path: Path) -> None:
    with _running(case, prefix, tmp_path) as running:
        async with (
            httpx.AsyncClient(base_url=running.served, timeout=10.0) as served,
            httpx.AsyncClient(base_url=running.bare, timeout=10.0) as bare,
        ):
            cold = await asyncio.gather(*(served.get(path) for path in case.paths))
            for path, response in zip(case.paths, cold, strict=True):
                assert response.status_code == 202, (path, response.status_code, response.text)
                assert response.headers["cache-status"] == MISS
            ready = await _get_when_ready(served, case.paths)
            expected = await asyncio.gather(*(bare.get(path) for path in case.paths))

    for path, want in zip(case.paths, expected, strict=True):
        _check_content(path, want)
    # Every difference of every URL, not only the first: the pattern tells more.
    differences = [
        difference
        for path, got, want in zip(case.paths, ready, expected, strict=True)
        for difference in _differences(path, got, want)
    ]
    assert not differences, "\n".join(differences)


def _differences(path: str, got: httpx.Response, want: httpx.Response) -> list[str]:
    """How the stored response `got` differs from the bare app's `want` (if it does)."""
    found = []
    if got.headers.get("cache-status") != HIT or not got.headers.get("age", "").isdigit():
        found.append(f"{path}: not a hit: {got.headers}")
    if got.status_code != want.status_code:
        found.append(f"{path}: status {got.status_code}, the app's {want.status_code}")
    if got.content != want.content:
        found.append(f"{path}: body {got.content[:200]!r}, the app's {want.content[:200]!r}")
    if got.headers.get("content-length") != str(len(got.content)):
        found.append(f"{path}: content-length {got.headers.get('content-length')}")
    if _compared_headers(got) != _compared_headers(want):
        found.append(
            f"{path}: headers {_compared_headers(got)}, the app's {_compared_headers(want)}"
        )
    return found
