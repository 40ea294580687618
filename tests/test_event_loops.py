"""Event loops: asyncio only, refused clearly elsewhere; in-process jobs on another loop.

The middleware, its Redis clients and the worker are asyncio's. On trio (hypercorn's
trio worker, anyio's trio backend) the server's lifespan startup is refused with one line
that says so, and a request on a server without lifespan gets the same message as a
`RuntimeError`, never `no running event loop` from deep inside a Redis client.

Starlette's `TestClient` serves the app on an event loop of its own, in a thread: jobs
run there, and `run_pending` called from the test's own loop still reports them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import warnings

import anyio
import httpx
import pytest

with warnings.catch_warnings():  # this Starlette would have TestClient use httpx2
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from asgi_worker import Config
from asgi_worker.testing import run_pending

from .loop_apps import report_app
from .processes import PROJECT, free_port

REFUSAL = "asgi-worker runs on asyncio only, and this server runs trio"


def test_hypercorns_trio_worker_is_refused_at_startup_in_one_clear_line() -> None:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "hypercorn",
        "--worker-class",
        "trio",
        "--bind",
        f"127.0.0.1:{port}",
        "tests.loop_apps:app",
    ]
    # The server ends by itself at once (hypercorn exits 0 after a failed startup): a
    # server still running would outlast the timeout.
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert f"asgi-worker: {REFUSAL}" in output
    assert "no running event loop" not in output


def test_a_request_on_trio_without_lifespan_is_a_clear_error() -> None:
    async def main() -> None:
        transport = httpx.ASGITransport(app=report_app(Config(redis_url="memory://")))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            with pytest.raises(RuntimeError, match=REFUSAL):
                await client.get("/report")
            # A request the cache does not handle goes to the app as ever.
            assert (await client.post("/report")).status_code == 405

    anyio.run(main, backend="trio")


@pytest.mark.parametrize("kind", ["memory", "inline"])
def test_run_pending_reports_jobs_that_ran_on_the_test_clients_loop(
    kind: str, config: Config
) -> None:
    if kind == "memory":
        config = Config(redis_url="memory://", prefix=config.prefix)
    else:
        config = Config(redis_url=config.redis_url, prefix=config.prefix, inline_worker=True)
    app = report_app(config)
    with TestClient(app) as client:
        assert client.get("/report").status_code == 202
        # The job runs on the client's loop, in its thread, maybe before this line.
        assert asyncio.run(run_pending(app)) == 1
        hit = client.get("/report")
        assert (hit.status_code, hit.text) == (200, "report")
        assert asyncio.run(run_pending(app)) == 0  # nothing new since
