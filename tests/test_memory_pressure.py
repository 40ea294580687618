"""A Redis over its `maxmemory` with `noeviction` under the worker: nothing dies, nothing
waits out a lease (docs/failure-modes.md).

Such a Redis refuses every write that could take memory, and every command queued in a
MULTI (arq's end-of-job transaction, the worker's health-check report); reads, DEL and
ZREM still pass. One `redis-server` of the module's own (noeviction) serves every test;
each fills it with keys of its own and frees them again (`Filler`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from arq.worker import Worker
from redis.exceptions import OutOfMemoryError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import ReplayWorker, WorkerMiddleware

from .apps import make_app
from .helpers import make_config
from .own_redis import OwnRedis, own_redis
from .processes import asgi_worker_command
from .stack import APP, REDIS_URL, environment, get_until_ready, running_stack, wait_until
from .test_arq_worker import WorkerFactory, drain, get

# The filler's values: few keys, so that freeing them is quick.
_FILLER_BYTES = 64 * 1024
# Headroom a test's Redis gets above what it holds before it is filled.
_ROOM_BYTES = 4 * 1024 * 1024
# How far below what a filled Redis holds its maxmemory goes: more than the buffers
# clients free by chance (the filler's query buffer, as large as its values, is freed once
# it is idle), which would let writes through.
_BELOW_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    directory = tmp_path_factory.mktemp("redis")
    with own_redis(directory, arguments=("--maxmemory-policy", "noeviction")) as own:
        yield own


class Filler:
    """Fills the test's Redis with keys of its own until it refuses writes; frees them."""

    def __init__(self, server: OwnRedis, prefix: str) -> None:
        self.client = server.client()
        self.prefix = prefix
        self.keys: list[str] = []

    def fill(self) -> None:
        """Write filler keys until a write is refused (OOM); then keep it refusing."""
        client = self.client
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + _ROOM_BYTES)
        value = b"x" * _FILLER_BYTES
        while True:
            key = f"{self.prefix}:filler:{len(self.keys)}"
            try:
                client.set(key, value)
            except OutOfMemoryError:
                break
            self.keys.append(key)
        # Just over maxmemory, a buffer freed by chance would let a write through.
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used - _BELOW_BYTES)
        with pytest.raises(OutOfMemoryError):
            client.set(f"{self.prefix}:filler:probe", b"x")

    def free(self) -> None:
        """Delete the filler: Redis takes writes again (its maxmemory stays)."""
        if self.keys:
            self.client.delete(*self.keys)
        self.keys = []

    def close(self) -> None:
        """Free the filler and lift the memory limit."""
        self.free()
        self.client.config_set("maxmemory", 0)
        self.client.close()


@pytest.fixture
def filler(server: OwnRedis, prefix: str) -> Iterator[Filler]:
    made = Filler(server, prefix)
    try:
        yield made
    finally:
        made.close()


def _lines(path: Path, text: str) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if text in line]


@pytest.mark.e2e
async def test_a_full_redis_ends_no_worker_and_every_url_is_served_once_memory_is_freed(
    prefix: str, server: OwnRedis, filler: Filler, tmp_path: Path
) -> None:
    # 4 jobs in the app when Redis fills up (their ends are refused), 8 queued (their
    # take is refused); a second worker starts on a full Redis with nothing to do (its
    # health-check report is refused). A claim lease of 120 s: a URL that waited one out
    # would fail the test.
    urls = [f"/hang?seconds={1.5 if n < 4 else 0.2}&n={n}" for n in range(12)]
    settings = {
        "redis_timeout": "0.5",
        "job_timeout": "5",
        "claim_ttl": "120",
        "max_jobs": "4",
        "fair_queueing": "false",
    }
    with running_stack(
        prefix, tmp_path, redis_url=server.url, counts_url=REDIS_URL, **settings
    ) as stack:
        async with stack.client() as http:
            for url in urls:
                assert (await http.get(url)).status_code == 202

            def every_slot_in_the_app() -> bool:
                return stack.runs("/hang") >= 4

            wait_until(
                "the worker's 4 jobs in the app", every_slot_in_the_app, within=10, stack=stack
            )
            filler.fill()
            idle_env = environment(f"{prefix}-idle", server.url, REDIS_URL)
            idle = stack.group.start("idle", asgi_worker_command("worker", APP), env=idle_env)

            await asyncio.sleep(3)  # the jobs' ends and the takes are refused meanwhile
            assert (await http.get("/hang?n=full")).status_code == 503  # the web side
            for process in (stack.worker, idle):
                assert process.poll() is None, f"a worker ended\n{stack.logs()}"

            filler.free()
            freed = time.monotonic()
            # Each URL polled as its client would, all at once.
            polls = (get_until_ready(http, url, within=10, interval=0.1) for url in urls)
            served = await asyncio.gather(*polls)
            served_in = time.monotonic() - freed
            assert [response.status_code for response in served] == [200] * len(urls)
        for process in (stack.web, stack.worker, idle):
            assert process.poll() is None, f"a process ended\n{stack.logs()}"
    worker_log, idle_log = tmp_path / "worker1.log", tmp_path / "idle.log"
    refused = _lines(worker_log, "refuses the worker's commands")
    back = _lines(worker_log, "takes the worker's commands again")
    report = _lines(idle_log, "health-check report")
    lost = _lines(worker_log, "but the commit failed")  # one line, the others held back
    print(f"[noeviction] every URL served {served_in:.2f} s after the filler was deleted")
    print("\n".join(refused + back + lost + report))
    assert served_in < 8, stack.logs()
    assert len(refused) == 1, stack.logs()
    assert "OutOfMemoryError" in refused[0]
    assert len(back) == 1, stack.logs()
    assert len(lost) == 1, stack.logs()
    assert "its claim is released" in lost[0]
    assert len(report) == 1, stack.logs()
    assert "OutOfMemoryError" in report[0]
    assert not _lines(worker_log, "Traceback"), stack.logs()


WORKERS = pytest.mark.parametrize(
    "worker_class", [ReplayWorker, Worker], ids=["ReplayWorker", "arq-Worker"]
)
"""`asgi-worker worker`'s, and arq's own (`arq module.WorkerSettings`)."""


@WORKERS
async def test_an_idle_worker_outlives_a_health_check_report_redis_refuses(
    worker_class: WorkerFactory,
    server: OwnRedis,
    filler: Filler,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # arq writes the report in its poll loop, where an error ended the worker: this one
    # starts on a full Redis, looks once (burst) and ends of itself.
    config = make_config(prefix, redis_url=server.url)
    filler.fill()
    with caplog.at_level(logging.WARNING, logger="asgi_worker"):
        await drain(make_app(config), config, worker_class)
    [missed] = [m for m in caplog.messages if "health-check report" in m]
    assert f"Redis at {server.url} did not take the worker's health-check report" in missed
    assert "OutOfMemoryError" in missed


@WORKERS
async def test_a_redis_that_refuses_writes_as_a_job_ends_takes_its_commit_a_moment_later(
    worker_class: WorkerFactory, server: OwnRedis, filler: Filler, prefix: str
) -> None:
    # The app's answer fills Redis up; 0.3 s later the filler is gone. Under
    # `ReplayWorker` the commit goes in the end-of-job MULTI/EXEC, under arq's own
    # `Worker` the job commits on its own: either is sent again until Redis takes it.
    config = make_config(prefix, redis_url=server.url)
    frees: list[asyncio.Task[None]] = []

    async def free_later() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(filler.free)

    async def fills_redis(request: Request) -> Response:
        await asyncio.to_thread(filler.fill)
        frees.append(asyncio.create_task(free_later()))
        return PlainTextResponse("answered as Redis filled up")

    app = Starlette(routes=[Route("/fills", fills_redis)])
    app.add_middleware(WorkerMiddleware, config=config)
    assert (await get(app, "/fills")).status_code == 202

    worker = await drain(app, config, worker_class)

    assert [free.done() for free in frees] == [True]
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    served = await get(app, "/fills")
    assert (served.status_code, served.text) == (200, "answered as Redis filled up")
