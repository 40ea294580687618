"""What a worker logs, once per line, however it is run (real worker subprocesses).

- `asgi-worker worker` on a Litestar app: Litestar configures the root logger as the app
  is built; a handler of our own beside it printed every line twice, in two formats.
- `arq module.WorkerSettings` (arq's own CLI): arq configures its own logger only, and
  the per-job line (`asgi-worker: GET /path: stored in ...`, docs/failure-modes.md)
  never showed; under an app that configured logging it shows once, not twice.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware

from .conftest import REDIS_URL
from .processes import PROJECT, asgi_worker_command

pytestmark = pytest.mark.e2e

JOB_LINE = "asgi-worker: GET /hello: stored in "


async def get_hello(config: Config) -> int:
    """GET /hello through an app of `config` in this process: a miss enqueues the job."""
    app = Starlette(routes=[Route("/hello", lambda request: PlainTextResponse("hello"))])
    app.add_middleware(WorkerMiddleware, config=config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return (await http.get("/hello")).status_code


def run(config: Config, command: list[str]) -> str:
    """Run a worker with `--burst` to its end; its output (stdout and stderr, in order)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    env.update(AW_LOG_REDIS_URL=REDIS_URL, AW_LOG_PREFIX=config.prefix, PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [*command, "--burst"],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout
    return done.stdout


def count(output: str, text: str) -> int:
    return sum(text in line for line in output.splitlines())


async def run_one_job(config: Config, command: list[str]) -> str:
    assert await get_hello(config) == 202
    output = run(config, command)
    assert await get_hello(config) == 200, output  # the worker ran and stored the job
    return output


async def test_under_litestar_each_worker_line_appears_once(config: Config, redis: Redis) -> None:
    output = await run_one_job(
        config, asgi_worker_command("worker", "tests.logging_apps:litestar_app")
    )
    for line in (
        "Starting worker for 1 functions",
        "redis_version=",
        "asgi_worker.replay(GET /hello,",
        JOB_LINE,
        "asgi_worker.replay ● 'stored'",
    ):
        assert count(output, line) == 1, f"{line!r}:\n{output}"
    # Through the handler the app configured, in its format: the app's logs stay one stream.
    assert next(line for line in output.splitlines() if JOB_LINE in line).startswith("INFO - ")


async def test_under_arq_the_job_line_appears(config: Config, redis: Redis) -> None:
    arq = [sys.executable, "-m", "arq", "tests.logging_apps.StarletteSettings"]
    output = await run_one_job(config, arq)
    assert count(output, JOB_LINE) == 1, output
    assert count(output, "asgi_worker.replay ● 'stored'") == 1, output  # arq's own line


async def test_under_arq_and_an_app_that_logs_the_job_line_appears_once(
    config: Config, redis: Redis
) -> None:
    arq = [sys.executable, "-m", "arq", "tests.logging_apps.LitestarSettings"]
    output = await run_one_job(config, arq)
    assert count(output, JOB_LINE) == 1, output
