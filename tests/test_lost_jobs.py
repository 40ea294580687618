"""No job vanishes into a lease: a claim whose job is lost is noticed and queued again.

A job is lost when its key is gone from the queue (evicted by a Redis under an LRU
`maxmemory-policy`, lost in a failover) or when it is in progress under a worker that was
killed. Its claim then held the URL at `202` until the claim's lease ran out; now the
next request after the enqueue's grace takes the claim over and queues the job again,
and exactly one job of the URL exists at a time (docs/failure-modes.md).

The first tests run the middleware and an in-test `ReplayWorker` on the test Redis, with
a lease (30 s) far longer than anything they wait for; the last ones run uvicorn and
`asgi-worker worker` processes (tests/stack.py), one of them on a Redis of its own that
evicts (allkeys-lru, a small maxmemory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import signal
import time
from collections import Counter
from pathlib import Path
from statistics import quantiles

import httpx
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, ReplayWorker, WorkerMiddleware, worker_settings
from asgi_worker.backends.redis.queue import ALIVE_FOR, ArqQueue
from asgi_worker.core.keys import RedisKeys, alive_key
from asgi_worker.web.lost_jobs import GRACE_MARGIN, LostJobs
from asgi_worker.worker.job_taker import JobTaker

from .helpers import claim_key, digest_of
from .own_redis import own_redis
from .stack import REDIS_URL, Stack, get_until_ready, running_stack, wait_until
from .test_arq_worker import drain, get

REDIS_TIMEOUT = 0.5
GRACE = REDIS_TIMEOUT + GRACE_MARGIN
"""How old a claim is before a request checks its job."""
LEASE = 30.0
URL = "/page?n=1"


@pytest.fixture
def lost_config(config: Config) -> Config:
    return dataclasses.replace(
        config, redis_timeout=REDIS_TIMEOUT, claim_ttl=LEASE, job_timeout=10.0
    )


class Pages:
    """An app behind the middleware whose endpoints count their runs, per URL."""

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()
        self.inside = asyncio.Event()
        self.gate = asyncio.Event()

    def app(self, config: Config) -> Starlette:
        async def page(request: Request) -> Response:
            self.runs[f"{request.url.path}?{request.url.query}"] += 1
            return PlainTextResponse(request.url.query)

        async def gated(request: Request) -> Response:
            self.runs[request.url.path] += 1
            self.inside.set()
            await self.gate.wait()
            return PlainTextResponse("gated")

        async def flaky(request: Request) -> Response:
            # Fine once (stale after a second, served stale for a minute), then failing.
            self.runs[request.url.path] += 1
            if self.runs[request.url.path] > 1:
                raise RuntimeError("the refresh fails")
            return PlainTextResponse(
                "first", headers={"cache-control": "max-age=1, stale-while-revalidate=60"}
            )

        app = Starlette(
            routes=[Route("/page", page), Route("/gated", gated), Route("/flaky", flaky)]
        )
        app.add_middleware(WorkerMiddleware, config=config)
        return app


async def job_ids(redis: Redis, config: Config) -> list[str]:
    """The ids of the jobs in the queue."""
    return [member.decode() for member in await redis.zrange(config.queue, 0, -1)]


async def holder(redis: Redis, config: Config, url: str) -> str:
    """The value of the URL's claim: the token of the job that holds it."""
    value = await redis.get(claim_key(config, await digest_of(config, url)))
    assert value is not None, f"{url} is not claimed"
    return str(value.decode())


def job_of(config: Config, digest: str, token: str) -> str:
    return RedisKeys(config.prefix).job_id(digest, token)


async def taken(app: Starlette, redis: Redis, config: Config, alive: str = "") -> str:
    """GET `URL`, then take its job as a worker with the heartbeat key `alive` does (with
    none, as arq's own worker does); returns the job's id."""
    assert (await get(app, URL)).status_code == 202
    [job] = await job_ids(redis, config)
    took = await JobTaker(redis, config.queue, alive=alive).take(1, lease_ms=60_000)
    assert [one.job_id for one in took.jobs] == [job]
    return job


def test_a_key_is_checked_past_the_grace_at_most_once_a_second_in_bounded_memory() -> None:
    now = [0.0]
    lost = LostJobs(RedisKeys("p"), grace=2.5, most=3, clock=lambda: now[0])
    assert not lost.due("a", held_for=2.4)  # its enqueue may be on its way
    assert lost.due("a", held_for=2.5)
    now[0] = 0.9
    assert not lost.due("a", held_for=3.4)
    assert lost.due("b", held_for=3.4)
    now[0] = 1.0
    assert lost.due("a", held_for=3.5)
    for key in "cdefg":
        assert lost.due(key, held_for=9.0)
    assert len(lost._checked) == 3  # the newest three: older ones are let go
    assert not lost.due("g", held_for=9.0)
    assert lost.due("a", held_for=9.0)  # forgotten, so due again (at most once more)


async def test_a_job_deleted_behind_its_claim_is_queued_again_after_the_grace(
    lost_config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config, pages = lost_config, Pages()
    app = pages.app(config)
    assert (await get(app, URL)).status_code == 202
    [old] = await job_ids(redis, config)
    await redis.delete(job_key_prefix + old)  # what an eviction does

    # Within the grace its enqueue may still be on its way: left alone.
    assert (await get(app, URL)).status_code == 202
    assert await job_ids(redis, config) == [old]

    await asyncio.sleep(GRACE)
    with caplog.at_level(logging.WARNING, logger="asgi_worker"):
        assert (await get(app, URL)).status_code == 202
    [new] = await job_ids(redis, config)
    digest = await digest_of(config, URL)
    assert new == job_of(config, digest, await holder(redis, config, URL)) != old
    [warning] = [r.getMessage() for r in caplog.records if "was gone" in r.getMessage()]
    assert warning.startswith(f"asgi-worker: job {old} was gone from queue {config.queue!r}")
    assert "; its request is queued again. " in warning
    assert "maxmemory-policy" in warning

    worker = await drain(app, config, ReplayWorker)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    served = await get(app, URL)
    assert (served.status_code, served.text) == (200, "n=1")
    assert pages.runs[URL] == 1


async def test_concurrent_requests_in_two_processes_queue_one_job_for_a_lost_one(
    lost_config: Config, redis: Redis
) -> None:
    # Two middlewares stand for two web processes; without coalescing every request of
    # a process sends its own lookup.
    config, pages = dataclasses.replace(lost_config, coalesce=False), Pages()
    apps = [pages.app(config), pages.app(config)]
    assert (await get(apps[0], URL)).status_code == 202
    [old] = await job_ids(redis, config)
    await redis.delete(job_key_prefix + old)
    await asyncio.sleep(GRACE)

    answers = await asyncio.gather(*(get(app, URL) for app in apps for _ in range(20)))

    assert [answer.status_code for answer in answers] == [202] * 40
    [new] = await job_ids(redis, config)
    digest = await digest_of(config, URL)
    assert new == job_of(config, digest, await holder(redis, config, URL)) != old
    worker = await drain(apps[1], config, ReplayWorker)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert (await get(apps[0], URL)).status_code == 200
    assert pages.runs[URL] == 1


async def test_a_check_that_stalls_is_cut_off_by_the_request_s_deadline_as_a_202(
    lost_config: Config, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, pages = lost_config, Pages()
    app = pages.app(config)
    assert (await get(app, URL)).status_code == 202
    [old] = await job_ids(redis, config)
    claim = await holder(redis, config, URL)
    await asyncio.sleep(GRACE)

    async def stalls(self: object, job_id: str) -> bool:
        await asyncio.sleep(60)
        return True

    monkeypatch.setattr(ArqQueue, "lost", stalls)
    began = time.monotonic()
    answer = await get(app, URL)
    took = time.monotonic() - began

    assert answer.status_code == 202  # the lookup answered: a miss, whatever the check
    assert took < REDIS_TIMEOUT + 0.3
    assert await job_ids(redis, config) == [old]
    assert await holder(redis, config, URL) == claim


async def test_the_back_off_marker_of_a_failed_refresh_is_not_taken_for_a_lost_job(
    lost_config: Config, redis: Redis
) -> None:
    # The marker lives error_ttl (5 s) of a 30 s lease: as a job's claim it would look
    # 25 s old, far past the grace, at once.
    config, pages = dataclasses.replace(lost_config, error_ttl=5.0), Pages()
    app = pages.app(config)
    assert (await get(app, "/flaky")).status_code == 202
    await drain(app, config, ReplayWorker)
    await asyncio.sleep(1.1)  # stale
    stale = await get(app, "/flaky")
    assert (stale.status_code, stale.headers["cache-status"]) == (
        200,
        "asgi-worker; hit; fwd=stale",
    )
    await drain(app, config, ReplayWorker)  # the refresh fails: the stale copy stays
    assert pages.runs["/flaky"] == 2
    marker = await holder(redis, config, "/flaky")
    assert marker.startswith("!")

    for _ in range(4):  # past the grace, and the checks' spacing
        assert (await get(app, "/flaky")).text == "first"
        await asyncio.sleep(GRACE / 2)

    assert await job_ids(redis, config) == []
    assert await holder(redis, config, "/flaky") == marker
    assert pages.runs["/flaky"] == 2


async def test_a_job_whose_commit_fails_for_good_is_not_taken_for_lost(
    lost_config: Config, redis: Redis
) -> None:
    # A key of the wrong type fails every commit of the path: the claim stays until its
    # lease ends, naming no job, so the jobs that would fail the same way are spaced.
    config, pages = lost_config, Pages()
    app = pages.app(config)
    await redis.hset(RedisKeys(config.prefix).path_stamp("/page"), "not", "a stamp")
    assert (await get(app, URL)).status_code == 202
    worker = await drain(app, config, ReplayWorker)
    assert (worker.jobs_complete, pages.runs[URL]) == (1, 1)
    assert (await holder(redis, config, URL)).startswith("!")

    await asyncio.sleep(GRACE)
    for _ in range(2):
        assert (await get(app, URL)).status_code == 202
        await asyncio.sleep(1.0)
    assert await job_ids(redis, config) == []


async def test_a_job_queued_or_running_under_a_live_worker_is_not_queued_again(
    lost_config: Config, redis: Redis
) -> None:
    # One slot: /gated runs (and holds it), /page waits in the queue behind it.
    config, pages = dataclasses.replace(lost_config, max_jobs=1), Pages()
    app = pages.app(config)
    for url in ("/gated", URL):
        assert (await get(app, url)).status_code == 202
    worker = ReplayWorker(**worker_settings(app, config), burst=True, handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        await asyncio.wait_for(pages.inside.wait(), 10)
        queued = await job_ids(redis, config)
        claims = [await holder(redis, config, url) for url in ("/gated", URL)]
        assert len(queued) == 2

        await asyncio.sleep(GRACE)
        for _ in range(3):  # three checks of each, a second apart
            for url in ("/gated", URL):
                assert (await get(app, url)).status_code == 202
            await asyncio.sleep(1.0)

        assert await job_ids(redis, config) == queued
        assert [await holder(redis, config, url) for url in ("/gated", URL)] == claims
        pages.gate.set()
        await asyncio.wait_for(running, 10)
    finally:
        pages.gate.set()
        await worker.close()
    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    assert (pages.runs["/gated"], pages.runs[URL]) == (1, 1)


async def test_a_job_in_progress_under_a_silent_worker_is_removed_and_queued_again(
    lost_config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    config, pages = lost_config, Pages()
    app = pages.app(config)
    # A worker takes the job, its heartbeat beats, then the worker dies.
    killed = alive_key(config.queue, "killed")
    old = await taken(app, redis, config, alive=killed)
    in_progress = in_progress_key_prefix + old
    marked = (await redis.get(in_progress)).decode()
    assert marked.startswith(f"{killed}@")
    await redis.set(killed, b"1", px=round(ALIVE_FOR * 1000))
    await asyncio.sleep(GRACE)
    assert (await get(app, URL)).status_code == 202  # its worker lives: left alone
    assert await job_ids(redis, config) == [old]
    # It was taken longer ago than a heartbeat lives, and its heartbeat has expired.
    taken_ms = int(marked.rpartition("@")[2])
    await redis.set(in_progress, f"{killed}@{taken_ms - round(ALIVE_FOR * 1000)}", xx=True)
    assert (await get(app, URL)).status_code == 202  # not yet: its heartbeat lives
    assert await job_ids(redis, config) == [old]
    await redis.delete(killed)
    await asyncio.sleep(1.0)  # the check's spacing

    with caplog.at_level(logging.WARNING, logger="asgi_worker"):
        assert (await get(app, URL)).status_code == 202

    [new] = await job_ids(redis, config)
    assert new != old
    # The old job is out of the queue, its key gone, its in-progress key a mark.
    assert not await redis.exists(job_key_prefix + old)
    assert await redis.get(in_progress) == b"lost"
    assert any(
        f"job {old} was in progress under a worker that has not reported" in r.getMessage()
        for r in caplog.records
    )
    worker = await drain(app, config, ReplayWorker)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    assert (await get(app, URL)).status_code == 200
    assert pages.runs[URL] == 1


async def test_a_job_just_taken_by_a_worker_that_was_idle_is_not_taken_for_lost(
    lost_config: Config, redis: Redis
) -> None:
    # An idle worker beats no heartbeat: its first beat comes within a second of a take.
    # A job taken a moment ago is not lost, heartbeat or none.
    config, pages = lost_config, Pages()
    app = pages.app(config)
    idle = alive_key(config.queue, "idle")
    old = await taken(app, redis, config, alive=idle)
    await asyncio.sleep(GRACE)  # the claim is past the grace, the take 1 s old
    assert not await redis.exists(idle)

    assert (await get(app, URL)).status_code == 202

    assert await job_ids(redis, config) == [old]
    assert (await redis.get(in_progress_key_prefix + old)).startswith(f"{idle}@".encode())


async def test_a_job_in_progress_under_arq_s_own_worker_waits_out_its_lease(
    lost_config: Config, redis: Redis
) -> None:
    # arq's worker marks a job in progress with '1' and keeps no heartbeat: whether it
    # lives is unknown, so its job is left to its lease, as before.
    config, pages = lost_config, Pages()
    app = pages.app(config)
    old = await taken(app, redis, config)
    assert await redis.get(in_progress_key_prefix + old) == b"1"

    await asyncio.sleep(GRACE)
    assert (await get(app, URL)).status_code == 202

    assert await job_ids(redis, config) == [old]
    assert await redis.get(in_progress_key_prefix + old) == b"1"


# End to end: uvicorn and `asgi-worker worker` processes, the default redis_timeout (2 s:
# a grace of 2.5 s) and a lease of 60 s.
E2E_LEASE = 60.0


def report(name: str, **figures: object) -> None:
    """Measured figures, printed (shown with `pytest -s`, and for a failing test)."""
    print(f"[{name}] " + " ".join(f"{key}={value}" for key, value in figures.items()))


def inside(stack: Stack, url: str) -> None:
    """Wait until the endpoint at `url` (a /hang) has been entered."""
    wait_until(f"{url} entered", lambda: url in stack.runs_by_url(), within=10, stack=stack)


@pytest.mark.e2e
async def test_e2e_a_job_deleted_behind_its_claim_is_served_within_seconds(
    prefix: str, tmp_path: Path
) -> None:
    settings = {"claim_ttl": str(E2E_LEASE), "job_timeout": "5", "max_jobs": "1"}
    with running_stack(prefix, tmp_path, **settings) as stack:
        busy, url = "/hang?seconds=2&case=busy", "/hang?seconds=0&case=deleted"
        async with stack.client() as http:
            assert (await http.get(busy)).status_code == 202
            inside(stack, busy)
            assert (await http.get(url)).status_code == 202  # queued behind the busy one
            [queued] = [
                job.decode()
                for job in stack.redis.zrange(f"{prefix}:queue", 0, -1)
                if not stack.redis.exists(in_progress_key_prefix + job.decode())
            ]
            stack.redis.delete(job_key_prefix + queued)
            deleted_at = time.monotonic()
            served = await get_until_ready(http, url, within=E2E_LEASE + 10, interval=0.1)
            elapsed = time.monotonic() - deleted_at
        runs, logs = stack.runs_by_url(), stack.logs()
    report("job key deleted", seconds_to_200=f"{elapsed:.2f}", lease=E2E_LEASE)
    assert served.status_code == 200, logs
    assert elapsed < 10 < E2E_LEASE
    assert runs == {busy: 1, url: 1}
    assert f"job {queued} was gone from queue" in logs


@pytest.mark.e2e
async def test_e2e_a_worker_killed_mid_job_is_redone_by_another_within_seconds(
    prefix: str, tmp_path: Path
) -> None:
    settings = {"claim_ttl": str(E2E_LEASE), "job_timeout": "10"}
    with running_stack(prefix, tmp_path, **settings) as stack:
        url = "/hang?seconds=2&case=killed"
        async with stack.client() as http:
            assert (await http.get(url)).status_code == 202
            inside(stack, url)
            killed = stack.worker
            second = stack.start_worker()
            killed.send_signal(signal.SIGKILL)
            assert killed.wait(timeout=5) == -signal.SIGKILL
            killed_at = time.monotonic()
            served = await get_until_ready(http, url, within=E2E_LEASE + 10, interval=0.1)
            elapsed = time.monotonic() - killed_at
        runs, logs = stack.runs_by_url(), stack.logs()
    report("worker SIGKILLed mid-job", seconds_to_200=f"{elapsed:.2f}", lease=E2E_LEASE)
    assert served.status_code == 200, logs
    assert served.json() == {"url": url, "pid": second.pid, "run": 2}
    # The heartbeat expires (5 s), the next request queues it again, it runs (2 s).
    assert elapsed < ALIVE_FOR + 2 + 5 < E2E_LEASE
    assert runs == {url: 2}
    assert "was in progress under a worker that has not reported" in logs


@pytest.mark.e2e
async def test_e2e_a_job_that_holds_its_worker_s_event_loop_runs_once(
    prefix: str, tmp_path: Path
) -> None:
    # The endpoint holds the worker's event loop longer than a heartbeat lives: the
    # heartbeat's own thread keeps it, so the job is not taken for lost and run again
    # by the second worker.
    settings = {"claim_ttl": str(E2E_LEASE), "job_timeout": "15"}
    with running_stack(prefix, tmp_path, **settings) as stack:
        stack.start_worker()
        seconds = ALIVE_FOR + 2
        url = f"/hang?seconds={seconds}&block=1"
        async with stack.client() as http:
            assert (await http.get(url)).status_code == 202
            served = await get_until_ready(http, url, within=seconds + 10, interval=0.2)
        runs, logs = stack.runs_by_url(), stack.logs()
    assert served.status_code == 200, logs
    assert runs == {url: 1}
    assert "has not reported" not in logs


# A Redis that evicts: every key of the cache and the queue on one redis-server with
# allkeys-lru and a maxmemory a few MiB above what it holds empty, and URLs of 32 KiB.
EVICTING_URLS = 300
ROOM_BYTES = 3 * 1024 * 1024
HANG = 0.05  # each job's time in the app: with 2 slots, the queue drains over ~8 s
POLL = 1.0  # the 202's Retry-After


@pytest.mark.e2e
async def test_e2e_under_a_redis_that_evicts_every_url_is_served_within_seconds(
    prefix: str, tmp_path: Path
) -> None:
    arguments = ("--maxmemory-policy", "allkeys-lru")
    with own_redis(tmp_path, arguments=arguments) as server:
        client = server.client()
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", used + ROOM_BYTES)
        settings = {
            "claim_ttl": str(E2E_LEASE),
            "job_timeout": "5",
            "max_jobs": "2",
            "fair_queueing": "false",
            # The 32 KiB answers must fill Redis: gzipped, their padding would take 100 B.
            "compress": "false",
        }
        urls = [f"/hang?seconds={HANG}&kib=32&n={n}" for n in range(EVICTING_URLS)]
        # Runs are counted on the test Redis, which evicts nothing.
        with running_stack(
            prefix, tmp_path, redis_url=server.url, counts_url=REDIS_URL, **settings
        ) as stack:
            async with stack.client(50) as http:
                served = await serve_all(http, urls, within=E2E_LEASE + 15)
            runs, logs = stack.runs_by_url(), stack.logs()
        evicted = int(client.info("stats")["evicted_keys"])
        client.close()
    lost = len(re.findall(r"was gone from queue", logs)) + sum(
        int(held) for held in re.findall(r"\(and (\d+) more like it", logs)
    )
    times = sorted(served.values())
    twice = sum(1 for count in runs.values() if count > 1)
    report(
        "allkeys-lru",
        urls=len(urls),
        served=len(served),
        evicted_keys=evicted,
        jobs_found_gone=lost,
        p50=f"{quantiles(times, n=10)[4]:.1f}",
        p90=f"{quantiles(times, n=10)[8]:.1f}",
        last=f"{times[-1]:.1f}",
        ran_twice=twice,
        lease=E2E_LEASE,
    )
    assert len(served) == len(urls), logs[-3000:]
    assert evicted > 0  # keys were evicted,
    assert lost > 0  # jobs among them, and they were noticed
    assert "evicts keys under maxmemory-policy allkeys-lru" in logs
    # The queue drains in about 8 s; a lost job costs its URL the grace and a poll.
    assert times[-1] < 25 < E2E_LEASE
    assert all(runs.get(url, 0) >= 1 for url in urls)


async def serve_all(http: httpx.AsyncClient, urls: list[str], *, within: float) -> dict[str, float]:
    """GET every URL, then each not yet served once per `POLL` s, as clients poll.

    Returns when each URL was first answered 200, in seconds from the start.
    """
    began = time.monotonic()
    served: dict[str, float] = {}
    limit = asyncio.Semaphore(50)

    async def one(url: str) -> None:
        async with limit:
            status = (await http.get(url)).status_code
        if status == 200:
            served[url] = time.monotonic() - began

    while len(served) < len(urls) and time.monotonic() - began < within:
        round_began = time.monotonic()
        await asyncio.gather(*(one(url) for url in urls if url not in served))
        await asyncio.sleep(max(0.0, POLL - (time.monotonic() - round_began)))
    return served
