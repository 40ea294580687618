"""How a `ReplayWorker` takes jobs and sleeps (worker/job_taker.py), on a Redis of its own.

Its own redis-server, so that the command counts are this test's alone. Each claim
below would fail under arq's own polling: an idle worker sent ~100 commands a second
(10 ms polls), a new job waited for the next poll, two workers raced for every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import timestamp_ms
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from asgi_worker import Config
from asgi_worker.worker.arq_worker import PreReadPool, ReplayWorker
from asgi_worker.worker.job_taker import IDLE_LOOK_EVERY, JobTaker, Taken, TakenJob
from asgi_worker.worker.settings import worker_settings

from .helpers import BASE_URL, build_app
from .own_redis import OwnRedis, own_redis


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    with own_redis(tmp_path_factory.mktemp("taking")) as own:
        yield own


def _config(server: OwnRedis, prefix: str, **changes: Any) -> Config:
    return Config(redis_url=server.url, prefix=prefix, ttl=60, retry_after=1, **changes)


@contextlib.asynccontextmanager
async def _workers(app: Any, config: Config, count: int = 1) -> AsyncIterator[list[ReplayWorker]]:
    """`count` ReplayWorkers on the queue in this loop; stopped (jobs finished) after."""
    workers = [
        ReplayWorker(**worker_settings(app, config), handle_signals=False) for _ in range(count)
    ]
    tasks = [asyncio.create_task(worker.async_run()) for worker in workers]
    try:
        yield workers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
            await worker.close()


@contextlib.asynccontextmanager
async def _http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url=BASE_URL
        ) as http,
    ):
        yield http


async def _commands(redis: Redis) -> int:
    info = await redis.info("stats")
    return int(info["total_commands_processed"])


async def _until_ready(http: httpx.AsyncClient, url: str, within: float) -> float:
    """Seconds until `url` is a 200, polled every millisecond."""
    started = time.perf_counter()
    while (await http.get(url)).status_code != 200:
        assert time.perf_counter() - started < within, f"{url} not ready within {within} s"
        await asyncio.sleep(0.001)
    return time.perf_counter() - started


async def _started_idle(workers: list[ReplayWorker]) -> None:
    # Past startup (the app's lifespan, the first look) and asleep on the wake list.
    while any(worker._taker_of is None for worker in workers):  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _idle_worker(server: OwnRedis, prefix: str) -> AsyncIterator[Config]:
    """One worker on `prefix`'s queue, started and asleep; its config."""
    config = _config(server, prefix)
    async with _workers(build_app(config), config) as workers:
        await _started_idle(workers)
        yield config


async def _seconds_until_run(queue: ArqRedis, job_id: str, within: float) -> float:
    """Seconds until a job is taken and run (its job key gone), looked at every 20 ms."""
    started = time.monotonic()
    while await queue.exists(job_key_prefix + job_id):
        assert time.monotonic() - started < within, f"not run within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_an_idle_worker_sends_about_one_command_a_second(
    server: OwnRedis, prefix: str
) -> None:
    redis = Redis.from_url(server.url)
    async with _idle_worker(server, prefix):
        before = await _commands(redis)
        await asyncio.sleep(4.0)
        sent = await _commands(redis) - before - 1  # less our first INFO
    await redis.aclose()
    # Per IDLE_LOOK_EVERY a look (the take, and the one read inside it, which Redis
    # counts too, and its clock) and a wait (BLPOP): 1.3 a second; the bound is 2 (arq: 100).
    assert sent / 4.0 <= 2.0, sent


async def test_a_miss_is_ready_within_milliseconds_not_a_poll_later(
    server: OwnRedis, prefix: str
) -> None:
    config = _config(server, prefix, poll_delay=0.5)  # arq's own poll would wait this long
    app = build_app(config)
    async with _workers(app, config) as workers, _http(app) as http:
        await _started_idle(workers)
        times = []
        for n in range(15):
            assert (await http.get(f"/echo?n={n}")).status_code == 202
            times.append(await _until_ready(http, f"/echo?n={n}", within=IDLE_LOOK_EVERY))
            await asyncio.sleep(0.05)  # the worker back asleep on the wake list
    times.sort()
    # Polled every ms, on a loaded CI machine: the median is far below a 0.5 s poll and
    # the 3 s idle look; woken, it is a few ms (benchmarks/scale.py measures it).
    assert times[len(times) // 2] < 0.1, times


async def test_a_job_enqueued_without_a_wake_token_runs_at_the_next_look(
    server: OwnRedis, prefix: str
) -> None:
    queue = ArqRedis.from_url(server.url)
    async with _idle_worker(server, prefix) as config:
        job = await queue.enqueue_job("not-a-function", _queue_name=config.queue)
        assert job is not None
        await _seconds_until_run(queue, job.job_id, within=IDLE_LOOK_EVERY + 2)
    await queue.aclose()


async def test_a_job_due_later_starts_when_due_not_at_the_next_look(
    server: OwnRedis, prefix: str
) -> None:
    queue = ArqRedis.from_url(server.url)
    async with _idle_worker(server, prefix) as config:
        # Due in 0.6 s, with no token: the look before learns when it is due.
        job = await queue.enqueue_job("not-a-function", _queue_name=config.queue, _defer_by=0.6)
        assert job is not None
        await queue.rpush(f"{config.queue}:wake", b"1")  # a look now, as an enqueue causes
        assert await _seconds_until_run(queue, job.job_id, within=1.5) >= 0.5
    await queue.aclose()


async def test_two_workers_run_every_job_once(server: OwnRedis, prefix: str) -> None:
    config = _config(server, prefix, max_jobs=3)
    app = build_app(config)
    urls = [f"/echo?n={n}" for n in range(60)]
    async with _workers(app, config, count=2) as workers, _http(app) as http:
        for url in urls:
            assert (await http.get(url)).status_code == 202
        for url in urls:
            await _until_ready(http, url, within=10)
    assert sum(worker.jobs_complete for worker in workers) == len(urls)
    assert all(worker.jobs_complete > 0 for worker in workers)
    assert sum(worker.jobs_failed + worker.jobs_retried for worker in workers) == 0


async def test_a_job_whose_worker_died_runs_again_after_its_lease(
    server: OwnRedis, prefix: str
) -> None:
    config = _config(server, prefix)
    app = build_app(config)
    queue = ArqRedis.from_url(server.url)
    async with _http(app) as http:
        assert (await http.get("/echo?dead=1")).status_code == 202
        # A worker takes the job and dies before it runs it.
        taken = await JobTaker(queue, config.queue).take(5, now_ms=timestamp_ms(), lease_ms=700)
        assert len(taken.jobs) == 1
        async with _workers(app, config):
            assert (await http.get("/echo?dead=1")).status_code == 202
            waited = await _until_ready(http, "/echo?dead=1", within=IDLE_LOOK_EVERY + 2)
    await queue.aclose()
    assert waited >= 0.4  # not before the lease ended


async def test_a_job_cancelled_in_its_worker_is_due_again_at_once(
    server: OwnRedis, prefix: str
) -> None:
    config = _config(server, prefix)
    app = build_app(config, slow_seconds=30)
    queue = ArqRedis.from_url(server.url)
    async with _workers(app, config) as workers, _http(app) as http:
        assert (await http.get("/slow")).status_code == 202
        worker = workers[0]
        started = time.monotonic()
        while not worker.tasks:
            assert time.monotonic() - started < 5, "the job never started"
            await asyncio.sleep(0.01)
        (job_id, task), *_ = worker.tasks.items()
        # Taken, it is scored at its lease's end, out of every other worker's reach.
        assert (await queue.zscore(config.queue, job_id) or 0) > timestamp_ms() + 1000
        worker.allow_pick_jobs = False  # so that it does not take it again at once
        task.cancel()  # as arq does to a job still running at shutdown
        await asyncio.gather(task, return_exceptions=True)
        score = await queue.zscore(config.queue, job_id)
        assert score is not None
        assert score <= timestamp_ms()
        assert not await queue.exists(in_progress_key_prefix + job_id)
    await queue.aclose()


async def test_the_take_skips_jobs_in_progress_elsewhere_and_says_what_is_due(
    server: OwnRedis, prefix: str
) -> None:
    queue_name = f"{prefix}:queue"
    redis = ArqRedis.from_url(server.url)
    now = timestamp_ms()
    await redis.zadd(queue_name, {"a": now - 30, "b": now - 20, "c": now - 10, "d": now + 5000})
    # `a` is run by a plain arq worker, which sets the in-progress key and no score.
    await redis.psetex(in_progress_key_prefix + "a", 3000, b"1")
    taker = JobTaker(redis, queue_name)

    first = await taker.take(1, now_ms=now, lease_ms=60_000)
    assert [(job.job_id, job.score) for job in first.jobs] == [("b", now - 20)]
    assert first.due_in_ms == 0  # read only `a` and `b`: `c` may be due, look again
    score_a = await redis.zscore(queue_name, "a")
    assert score_a is not None
    assert now + 2000 < score_a <= now + 3000  # a's lease end

    second = await taker.take(5, now_ms=now, lease_ms=60_000)
    assert [(job.job_id, job.score) for job in second.jobs] == [("c", now - 10)]
    assert second.due_in_ms == int(score_a) - now  # `a` comes due first, then `d`
    assert await taker.take(5, now_ms=now, lease_ms=60_000) == Taken([], int(score_a) - now)
    await redis.delete(queue_name, *(in_progress_key_prefix + job for job in "abcd"))
    await redis.delete(*(retry_key_prefix + job for job in "bc"))
    await redis.aclose()


async def test_a_wait_ends_at_a_wake_token_and_takes_in_the_same_round_trip(
    server: OwnRedis, prefix: str
) -> None:
    queue_name = f"{prefix}:queue"
    redis = ArqRedis.from_url(server.url)
    taker = JobTaker(redis, queue_name)
    assert await taker.take(5, lease_ms=60_000, wait=0.2) == Taken([], None)  # timed out

    await redis.script_flush()  # as after a restart: the take is loaded again, and runs
    await redis.zadd(queue_name, {"job": timestamp_ms() - 1})
    await redis.rpush(f"{queue_name}:wake", b"1")
    started = time.monotonic()
    taken = await taker.take(5, lease_ms=60_000, wait=5.0)
    assert time.monotonic() - started < 1.0
    assert [job.job_id for job in taken.jobs] == ["job"]
    assert await redis.llen(f"{queue_name}:wake") == 0
    await redis.delete(queue_name, in_progress_key_prefix + "job", retry_key_prefix + "job")
    await redis.aclose()


async def test_a_worker_told_to_stop_stops_at_once_not_at_its_next_look(
    server: OwnRedis, prefix: str
) -> None:
    # arq's stop waits until the worker's `tasks` is empty; a job that ended stayed there
    # until the next look, up to IDLE_LOOK_EVERY later, under a BLPOP.
    config = _config(server, prefix)
    app = build_app(config)
    worker = ReplayWorker(**worker_settings(app, config), handle_signals=False)
    run = asyncio.create_task(worker.async_run())
    async with _http(app) as http:
        assert (await http.get("/echo?stop=1")).status_code == 202
        await _until_ready(http, "/echo?stop=1", within=5)
    await asyncio.sleep(0.2)  # idle, on the wake list
    started = time.monotonic()
    worker.handle_sig_wait_for_completion(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), IDLE_LOOK_EVERY + 2)
    assert time.monotonic() - started < 1.0
    await worker.close()


async def test_the_take_reads_each_job_as_arqs_run_job_would(server: OwnRedis, prefix: str) -> None:
    queue_name = f"{prefix}:queue"
    ids = [f"{prefix}:{name}" for name in ("kept", "gone", "aborted")]
    kept, gone, aborted = ids
    redis = ArqRedis.from_url(server.url)
    now = timestamp_ms()
    await redis.zadd(queue_name, {job_id: now - 10 for job_id in ids})
    await redis.set(job_key_prefix + kept, b"the job")
    await redis.set(job_key_prefix + aborted, b"another job")
    await redis.set(retry_key_prefix + kept, 2)  # run twice already, by workers that died
    await redis.zadd(abort_jobs_ss, {aborted: now})

    taken = await JobTaker(redis, queue_name, read_aborts=True).take(5, lease_ms=60_000)

    by_id = {job.job_id: job for job in taken.jobs}
    assert (by_id[kept].payload, by_id[kept].tries, by_id[kept].aborted) == (b"the job", 3, False)
    assert (by_id[gone].payload, by_id[gone].tries) == (None, 1)  # expired: arq fails it
    assert by_id[aborted].aborted
    assert await redis.zscore(abort_jobs_ss, aborted) is None  # as arq's read removes it
    assert 88000 < await redis.ttl(retry_key_prefix + kept) <= 88400  # arq's retry key life
    await redis.delete(
        queue_name,
        *(key + job_id for job_id in ids for key in (job_key_prefix, retry_key_prefix)),
        *(in_progress_key_prefix + job_id for job_id in ids),
    )
    await redis.aclose()


async def test_a_job_starts_without_a_read_of_its_own(
    server: OwnRedis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # arq's run_job reads each job in a MULTI of its own, and its end is another: the take
    # answers the read, so each job is one MULTI (its end, with the commit) and no more.
    config = _config(server, prefix)
    app = build_app(config)
    redis = Redis.from_url(server.url)
    urls = [f"/echo?read={n}" for n in range(20)]
    async with _workers(app, config) as workers, _http(app) as http:
        await _started_idle(workers)
        before = await _multi_count(redis)
        for url in urls:
            assert (await http.get(url)).status_code == 202
            await _until_ready(http, url, within=5)
        assert await _multi_count(redis) - before == len(urls)
    assert workers[0].jobs_complete == len(urls)
    assert "is not the take's" not in caplog.text
    await redis.aclose()


async def _multi_count(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_multi", {}).get("calls", 0))


async def test_a_read_the_take_did_not_expect_goes_to_redis(
    server: OwnRedis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Should an arq release read a job differently, the job still gets Redis's answers.
    redis = ArqRedis.from_url(server.url)
    job_id = f"{prefix}:job"
    await redis.set(job_key_prefix + job_id, b"stored")
    used: list[bool] = []
    read = TakenJob(job_id, 0, b"from the take", 1, aborted=False)
    pool = PreReadPool(redis, read, lambda: used.append(True))
    async with pool.pipeline(transaction=True) as pipe:
        pipe.get(job_key_prefix + job_id)
        pipe.exists(job_key_prefix + job_id)
        replies = await pipe.execute()
    assert used == [True]
    assert replies == [b"stored", 1]
    assert "is not the take's" in caplog.text
    assert await pool.get(job_key_prefix + job_id) == b"stored"  # the rest: the pool's
    await redis.delete(job_key_prefix + job_id)
    await redis.aclose()
