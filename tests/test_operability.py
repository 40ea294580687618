"""Operability: a missing worker is loud, `stats --check` probes the queue, jobs log a line.

On real Redis, under the test's own prefix (and so its own arq queue and health key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import httpx
import pytest
from arq.constants import health_check_key_suffix
from arq.jobs import serialize_job
from click.testing import CliRunner
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware, worker_settings
from asgi_worker.backends.redis import queue as queue_module
from asgi_worker.backends.redis.queue import (
    HEALTH_REPORT_INTERVAL,
    JOB_FUNCTION,
    NO_WORKER_AFTER,
    SnapshotBytes,
    WorkerWatch,
    deserialize,
    serialize,
)
from asgi_worker.cli.commands import main
from asgi_worker.core.codec import encode_snapshot
from asgi_worker.core.keys import RequestSnapshot
from asgi_worker.observability.stats import collect_stats
from asgi_worker.testing import run_pending, worker_running

from .conftest import REDIS_URL

NO_WORKER = "asgi-worker; fwd=uri-miss; detail=no-worker"
MISS = "asgi-worker; fwd=uri-miss"


def plain_app(config: Config) -> Starlette:
    async def answer(request: Request) -> Response:
        return PlainTextResponse(f"{request.url.path}?{request.url.query}")

    app = Starlette(routes=[Route("/{path:path}", answer)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


async def get(app: Starlette, url: str, **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.get(url, headers=headers)


async def write_health(redis: Redis, config: Config) -> None:
    """A health report as arq's `Worker.record_health` writes it (interval + 1 s)."""
    report = b"Nov-30 12:00:00 j_complete=0 j_failed=0 j_retried=0 j_ongoing=0 queued=0"
    lifetime_ms = int((HEALTH_REPORT_INTERVAL + 1) * 1000)
    await redis.psetex(config.queue + health_check_key_suffix, lifetime_ms, report)


def no_worker_warnings(caplog: pytest.LogCaptureFixture, config: Config) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
        and "no worker has reported" in record.getMessage()
        and repr(config.queue) in record.getMessage()
    ]


@pytest.fixture
def absent_is_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """An absent health key counts as no worker at once (not after 2 x 60 s + slack)."""
    monkeypatch.setattr(queue_module, "NO_WORKER_AFTER", HEALTH_REPORT_INTERVAL)


# -- the web process notices a missing worker ------------------------------------------------


@pytest.mark.usefixtures("absent_is_enough")
async def test_no_worker_is_warned_once_and_said_in_cache_status(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asgi_worker")
    app = plain_app(config)
    for url in ("/a", "/b", "/a", "/c"):
        response = await get(app, url)
        assert response.status_code == 202
        assert response.headers["cache-status"] == NO_WORKER, url
    warnings = no_worker_warnings(caplog, config)
    assert len(warnings) == 1, warnings
    assert "asgi-worker worker" in warnings[0]  # says what to do about it


@pytest.mark.usefixtures("absent_is_enough")
async def test_a_reporting_worker_gets_a_plain_202(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    await write_health(redis, config)
    app = plain_app(config)
    for url in ("/a", "/b"):
        response = await get(app, url)
        assert response.status_code == 202
        assert response.headers["cache-status"] == MISS
    assert no_worker_warnings(caplog, config) == []


@pytest.mark.usefixtures("absent_is_enough")
async def test_a_real_worker_writes_the_key_the_web_process_reads(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    gate = asyncio.Event()

    async def slow(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse("done")

    app = Starlette(routes=[Route("/{path:path}", slow)])
    app.add_middleware(WorkerMiddleware, config=config)
    health_key = config.queue + health_check_key_suffix
    try:
        async with worker_running(app, config):
            deadline = time.monotonic() + 10
            while not await redis.exists(health_key):
                assert time.monotonic() < deadline, "the worker wrote no health report"
                await asyncio.sleep(0.02)
            response = await get(app, "/slow")
            assert response.status_code == 202
            assert response.headers["cache-status"] == MISS
            gate.set()
    finally:
        gate.set()
    assert no_worker_warnings(caplog, config) == []


def test_the_watch_knows_the_workers_report_interval() -> None:
    settings = worker_settings(plain_app(Config(prefix="interval")), Config(prefix="interval"))
    assert settings["health_check_interval"] == HEALTH_REPORT_INTERVAL
    assert 2 * HEALTH_REPORT_INTERVAL < NO_WORKER_AFTER


class FakeRedis:
    """Answers PTTL for the health key with what `ttl_ms` holds; counts the reads."""

    def __init__(self) -> None:
        self.ttl_ms = -2
        self.reads = 0

    async def pttl(self, key: str) -> int:
        assert key == "jobs" + health_check_key_suffix
        self.reads += 1
        return self.ttl_ms


async def test_the_watch_waits_out_two_report_intervals_and_reads_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    redis = FakeRedis()
    watch = WorkerWatch(redis, "jobs", clock=lambda: now[0])  # type: ignore[arg-type]

    async def at(seconds: float) -> bool:
        now[0] = 1000.0 + seconds
        return await watch.check(1.0)

    # Absent: no report in the key's 61 s; a busy worker may miss one, so not yet.
    assert not await at(0)
    assert not await at(5)
    assert redis.reads == 1
    assert not await at(69)  # 69 s absent + 61 s lifetime = 130 s: not over
    assert await at(80)  # 141 s of silence
    assert await at(85)
    assert redis.reads == 3
    assert await at(100)
    assert await at(139)  # warned at 80: the next warning is due at 140
    assert await at(150)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().count("'jobs'") for r in warnings] == [1, 1]
    assert warnings[0].queue == "jobs"  # type: ignore[attr-defined]

    redis.ttl_ms = 30_000  # a worker reported 31 s ago
    assert not await at(160)
    redis.ttl_ms = -2  # gone again: the silence counts from this check
    assert not await at(170)


async def test_hits_and_in_process_jobs_never_read_the_health_key(
    config: Config, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = WorkerWatch.check

    async def counted(self: WorkerWatch, within: float) -> bool:
        reads.append("read")
        return await original(self, within)

    monkeypatch.setattr(WorkerWatch, "check", counted)
    app = plain_app(config)
    assert (await get(app, "/a")).status_code == 202
    assert len(reads) == 1
    await run_pending(app, config)
    hit = await get(app, "/a")
    assert hit.status_code == 200
    assert len(reads) == 1

    inline = plain_app(dataclasses.replace(config, inline_worker=True))
    response = await get(inline, "/b")
    assert response.status_code == 202
    assert response.headers["cache-status"] == MISS
    assert len(reads) == 1  # the process is the worker: nothing to read


# -- asgi-worker stats --check ------------------------------------------------------------


def check(config: Config, *arguments: str) -> tuple[int, str]:
    env = {"ASGI_WORKER_REDIS_URL": REDIS_URL, "ASGI_WORKER_PREFIX": config.prefix}
    result = CliRunner().invoke(main, ["stats", "--check", *arguments], env=env)
    return result.exit_code, result.output


async def test_stats_check_fails_without_a_worker(config: Config, redis: Redis) -> None:
    assert (await get(plain_app(config), "/a")).status_code == 202
    code, output = await asyncio.to_thread(check, config)
    assert code == 1
    assert output.count("\n") == 1
    assert output.startswith(f"unhealthy: no worker serves queue {config.queue!r}")


async def test_stats_check_passes_with_a_reporting_worker(config: Config, redis: Redis) -> None:
    await write_health(redis, config)
    assert (await get(plain_app(config), "/a")).status_code == 202
    code, output = await asyncio.to_thread(check, config)
    assert code == 0, output
    assert output.count("\n") == 1
    assert output.startswith(f"ok: a worker serves queue {config.queue!r} (1 queued, oldest ")

    code, output = await asyncio.to_thread(check, config, "--json")
    assert code == 0
    assert json.loads(output)["ok"] is True


async def test_stats_check_fails_when_the_oldest_job_is_too_old(
    config: Config, redis: Redis
) -> None:
    await write_health(redis, config)
    ten_minutes_ago = (time.time() - 600) * 1000
    await redis.zadd(config.queue, {f"{config.prefix}:stuck": ten_minutes_ago})
    code, output = await asyncio.to_thread(check, config)  # default --max-age 300
    assert code == 1
    assert output.startswith(f"unhealthy: queue {config.queue!r} is behind: its oldest job is 6")
    code, output = await asyncio.to_thread(check, config, "--max-age", "900")
    assert code == 0, output

    found = await collect_stats(config, redis, redis)
    assert found.oldest_queued is not None
    assert 599 < found.oldest_queued < 700


# -- the worker's log ---------------------------------------------------------------------


async def test_each_job_logs_one_line_with_fields_and_no_secret(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = dataclasses.replace(
        config, key_credentials=True, secret="correct horse battery staple"
    )
    app = plain_app(config)
    credentials = {"authorization": "Bearer tok-3141592653", "cookie": "session=s-2718281828"}
    assert (await get(app, "/report?year=2024&x=%0A", **credentials)).status_code == 202
    assert (await get(app, "/plain")).status_code == 202
    assert await run_pending(app, config) == 2

    jobs = [r for r in caplog.records if getattr(r, "outcome", None) is not None]
    assert len(jobs) == 2
    by_path = {r.path: r for r in jobs}  # type: ignore[attr-defined]
    record = by_path["/report"]
    assert record.levelno == logging.INFO
    assert (record.method, record.query, record.outcome) == (  # type: ignore[attr-defined]
        "GET",
        "year=2024&x=%0A",
        "stored",
    )
    assert 0 <= record.duration < 10  # type: ignore[attr-defined]
    assert len(record.digest) == 32  # type: ignore[attr-defined]
    message = record.getMessage()
    assert message.startswith("asgi-worker: GET /report?year=2024&x=%0A: stored in ")
    assert message.endswith(f"[{record.digest}]")  # type: ignore[attr-defined]

    # arq's own job-start line shows the request, not msgpack.
    starts = [
        r.getMessage() for r in caplog.records if r.name == "arq.worker" and "→" in r.getMessage()
    ]
    assert any(f"{JOB_FUNCTION}(GET /report?year=2024&x=%0A, " in line for line in starts), starts
    assert not any("\\x" in line for line in starts), starts

    everything = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in ("tok-3141592653", "s-2718281828", "correct horse"):
        assert secret not in everything


def test_a_job_snapshot_deserializes_as_bytes_that_show_the_request() -> None:
    snapshot = RequestSnapshot(
        scheme="http",
        host="example.com",
        root_path="",
        path="/a b/\n",
        raw_path=None,
        query_string=b"q=1",
        headers=(),
    )
    encoded = encode_snapshot(snapshot)
    payload = serialize_job(JOB_FUNCTION, (encoded, "t0", 1.5), {}, None, 0, serializer=serialize)
    job = deserialize(payload)
    argument = job["a"][0]
    assert isinstance(argument, SnapshotBytes)
    assert type(argument) is not bytes
    assert isinstance(argument, bytes)
    assert argument == encoded
    assert repr(argument) == "GET /a b/\\n?q=1"  # one log line stays one line
    assert repr(SnapshotBytes(b"\x93junk")) == "<unreadable request snapshot, 5 bytes>"
    # Other functions' arguments are left alone.
    other = deserialize(serialize_job("other", (encoded,), {}, None, 0, serializer=serialize))
    assert type(other["a"][0]) is bytes
