"""The CLI finds the Config in the app: `asgi-worker worker app:app` with no --config."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis as sync_redis

from . import cli_apps
from .conftest import REDIS_URL
from .processes import PROJECT, asgi_worker_command


@pytest.fixture(autouse=True)
def clean_keys() -> Iterator[None]:
    client = sync_redis.Redis.from_url(REDIS_URL)
    yield
    for pattern in (f"{cli_apps.PREFIX}*", f"arq:*{cli_apps.PREFIX}*"):
        for key in client.scan_iter(match=pattern, count=1000):
            client.delete(key)
    client.close()


@dataclass(frozen=True)
class Result:
    exit_code: int
    output: str


def invoke(*arguments: str, **env: str) -> Result:
    """Run the CLI with no ASGI_WORKER_* variable but those given.

    In a process of its own: the worker installs signal handlers on an event loop of its
    own, which must not outlive it inside the test process.
    """
    clean = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    done = subprocess.run(
        asgi_worker_command(*arguments),
        cwd=PROJECT,
        env={**clean, "AW_CLI_PREFIX": cli_apps.PREFIX, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return Result(done.returncode, done.stdout + done.stderr)


def get(path: str) -> httpx.Response:
    async def fetch() -> httpx.Response:
        # A new app each time: its Redis connections belong to this event loop.
        transport = httpx.ASGITransport(app=cli_apps.create_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path)

    return asyncio.run(fetch())


def test_worker_takes_the_config_of_the_middleware_in_a_mounted_sub_app() -> None:
    assert get("/sub/report").status_code == 202
    result = invoke("worker", "tests.cli_apps:app", "--burst")
    assert result.exit_code == 0, result.output
    hit = get("/sub/report")
    assert (hit.status_code, hit.text) == (200, "answered /sub/report")
    assert hit.headers["cache-status"] == "asgi-worker; hit"


def test_worker_without_a_middleware_or_config_says_how_to_pass_one() -> None:
    result = invoke("worker", "tests.cli_apps:bare", "--burst")
    assert result.exit_code == 2
    assert "no WorkerMiddleware found" in result.output
    assert "--config" in result.output


def test_a_config_that_is_not_the_apps_is_reported_at_start() -> None:
    result = invoke(
        "worker", "tests.cli_apps:app", "--config", "tests.cli_apps:other_config", "--burst"
    )
    assert result.exit_code == 0, result.output
    assert f"prefix '{cli_apps.PREFIX}-other'" in result.output
    assert f"prefix '{cli_apps.PREFIX}'" in result.output


def test_environment_variables_still_win() -> None:
    assert get("/sub/env").status_code == 202
    # The environment names another prefix: that worker must not take the app's jobs.
    result = invoke(
        "worker",
        "tests.cli_apps:app",
        "--burst",
        ASGI_WORKER_REDIS_URL=REDIS_URL,
        ASGI_WORKER_PREFIX=cli_apps.PREFIX + "-env",
    )
    assert result.exit_code == 0, result.output
    assert "does not match the WorkerMiddleware in the app" in result.output
    assert get("/sub/env").status_code == 202


def test_stats_and_invalidate_find_the_config_with_app() -> None:
    assert get("/sub/x").status_code == 202
    assert invoke("worker", "tests.cli_apps:app", "--burst").exit_code == 0
    stats = invoke("stats", "--app", "tests.cli_apps:app")
    assert stats.exit_code == 0, stats.output
    assert f"cache '{cli_apps.PREFIX}'" in stats.output
    assert "stored responses  1 " in stats.output
    gone = invoke("invalidate", "path", "/sub/x", "--app", "tests.cli_apps:app")
    assert (gone.exit_code, gone.output.strip()) == (0, "1 entry invalidated")
    assert get("/sub/x").status_code == 202
