"""`ReplayWorker` commits each replay in the transaction that ends its arq job.

Real Redis, real arq workers in burst mode. `RedisStore.commit` is wrapped to count the
commits a job sends on its own: under `ReplayWorker` there are none, except after a
NOSCRIPT (the script is then loaded by that commit); under arq's plain `Worker`, and when
the queue is on another Redis, each job sends its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, ReplayWorker, WorkerMiddleware, worker_settings
from asgi_worker.backends.base import Committed, Write
from asgi_worker.backends.redis import scripts
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.invalidation_targets import ByPath
from asgi_worker.core.keys import RedisKeys

from .apps import make_app

WorkerFactory = Callable[..., Worker]


@pytest.fixture
def own_commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digests of the commits jobs send on their own (not in arq's transaction)."""
    sent: list[str] = []
    commit = RedisStore.commit

    async def counted(
        self: RedisStore, digest: str, token: str, started: float, write: Write
    ) -> Committed:
        sent.append(digest)
        return await commit(self, digest, token, started, write)

    monkeypatch.setattr(RedisStore, "commit", counted)
    return sent


async def drain(app: Starlette, config: Config, worker_class: WorkerFactory) -> Worker:
    worker = worker_class(**worker_settings(app, config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker


async def get(app: Starlette, url: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.get(url)


async def arq_keys_left(redis: Redis, config: Config) -> list[bytes]:
    """arq's keys of this test's jobs that a finished job must not leave behind."""
    left = [key async for key in redis.scan_iter(match=f"arq:*{config.prefix}*", count=1000)]
    return left + await redis.zrange(config.queue, 0, -1)


async def run_one(
    app: Starlette, config: Config, url: str, worker_class: WorkerFactory = ReplayWorker
) -> Worker:
    assert (await get(app, url)).status_code == 202
    worker = await drain(app, config, worker_class)
    assert (worker.jobs_complete, worker.jobs_failed) == (1, 0)
    return worker


async def test_a_replay_commits_in_the_transaction_that_ends_its_job(
    config: Config, redis: Redis, own_commits: list[str]
) -> None:
    app = make_app(config)
    await run_one(app, config, "/echo?warm=1")  # the script is loaded after this, either way
    own_commits.clear()

    await run_one(app, config, "/echo?a=1")

    assert own_commits == []
    served = await get(app, "/echo?a=1")
    assert served.status_code == 200
    assert served.json()["query"] == "a=1"
    assert await arq_keys_left(redis, config) == []
    assert [key async for key in redis.scan_iter(match=f"{config.prefix}:*claim*")] == []


async def test_jobs_ending_together_each_commit_their_own_result(
    config: Config, redis: Redis, own_commits: list[str]
) -> None:
    # max_jobs jobs wait inside the endpoint, then all end in the same loop iteration:
    # each must find its own slot, so that no commit is lost or sent for another job.
    inside = 0
    all_inside, gate = asyncio.Event(), asyncio.Event()

    async def gated(request: Request) -> Response:
        nonlocal inside
        if "n" in request.query_params:
            inside += 1
            if inside == config.max_jobs:
                all_inside.set()
            await gate.wait()
        return PlainTextResponse(request.url.query)

    app = Starlette(routes=[Route("/gated", gated)])
    app.add_middleware(WorkerMiddleware, config=config)
    await run_one(app, config, "/gated?warm")  # the commit script is loaded after this
    own_commits.clear()
    urls = [f"/gated?n={n}" for n in range(3 * config.max_jobs)]
    for url in urls:
        assert (await get(app, url)).status_code == 202

    running = asyncio.create_task(drain(app, config, ReplayWorker))
    await asyncio.wait_for(all_inside.wait(), 10)
    gate.set()
    worker = await asyncio.wait_for(running, 10)

    assert (worker.jobs_complete, worker.jobs_failed) == (len(urls), 0)
    assert own_commits == []
    for url in urls:
        served = await get(app, url)
        assert (served.status_code, served.text) == (200, url.partition("?")[2])
    assert await arq_keys_left(redis, config) == []


async def test_arq_s_own_worker_commits_each_job_on_its_own(
    config: Config, redis: Redis, own_commits: list[str]
) -> None:
    app = make_app(config)
    await run_one(app, config, "/echo?a=1", Worker)
    assert len(own_commits) == 1
    assert (await get(app, "/echo?a=1")).status_code == 200
    assert await arq_keys_left(redis, config) == []


async def test_a_queue_on_another_redis_keeps_the_commit_in_the_job(
    config: Config, redis: Redis, own_commits: list[str]
) -> None:
    # The same server under another URL: asgi-worker cannot know, and must not assume,
    # that the queue's transaction reaches the store's Redis.
    other_url = config.redis_url.replace("127.0.0.1", "localhost")
    assert other_url != config.redis_url
    config = dataclasses.replace(config, queue_redis_url=other_url)
    app = make_app(config)
    await run_one(app, config, "/echo?warm=1")
    await run_one(app, config, "/echo?a=1")
    assert len(own_commits) == 2
    assert (await get(app, "/echo?a=1")).status_code == 200


async def test_a_script_missing_from_redis_is_loaded_by_a_commit_of_its_own(
    config: Config, redis: Redis, own_commits: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit script text no Redis has seen: the first job's EVALSHA gets NOSCRIPT, as
    # after a Redis restart.
    unseen = scripts.COMMIT + f"\n-- {uuid.uuid4().hex}\n"
    monkeypatch.setattr(scripts, "COMMIT", unseen)
    app = make_app(config)

    await run_one(app, config, "/echo?a=1")
    assert len(own_commits) == 1  # the fallback, which loaded the script
    await run_one(app, config, "/echo?a=2")
    assert len(own_commits) == 1  # back in arq's transaction

    for url in ("/echo?a=1", "/echo?a=2"):
        assert (await get(app, url)).status_code == 200
    assert await arq_keys_left(redis, config) == []


async def test_a_commit_that_fails_in_the_transaction_is_logged_and_the_worker_goes_on(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # A key of the wrong type makes the commit script fail inside EXEC.
    await redis.hset(RedisKeys(config.prefix).path_stamp("/echo"), "not", "a stamp")
    app = make_app(config)
    assert (await get(app, "/echo?a=1")).status_code == 202
    assert (await get(app, "/stream")).status_code == 202

    with caplog.at_level(logging.ERROR, logger="asgi_worker"):
        worker = await drain(app, config, ReplayWorker)

    assert (worker.jobs_complete, worker.jobs_failed) == (2, 0)
    [failure] = [r.getMessage() for r in caplog.records if "commit failed" in r.getMessage()]
    assert failure.startswith("asgi-worker: /echo?a=1: stored, but the commit failed")
    assert "WRONGTYPE" in failure
    # arq's end of the job was written all the same; the other job stored its result.
    assert await arq_keys_left(redis, config) == []
    assert (await get(app, "/stream")).status_code == 200
    # Nothing stored; the claim holds until its lease runs out.
    assert (await get(app, "/echo?a=1")).status_code == 202


async def test_a_refused_commit_is_logged_at_the_end_of_the_job(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(config)
    assert (await get(app, "/echo?a=1")).status_code == 202
    # An invalidation after the claim: the job's result is refused.
    await RedisStore(redis, prefix=config.prefix, claim_ttl=60).invalidate(ByPath("/echo"))

    with caplog.at_level(logging.INFO, logger="asgi_worker"):
        await drain(app, config, ReplayWorker)

    assert "asgi-worker: /echo?a=1: stored, refused" in caplog.messages
    assert (await get(app, "/echo?a=1")).status_code == 202  # not stored: a new job


async def test_other_jobs_finish_as_under_arq_s_own_worker(config: Config, redis: Redis) -> None:
    async def answer(ctx: dict[Any, Any]) -> int:
        return 42

    pool = await create_pool(RedisSettings.from_dsn(config.redis_url))
    job = await pool.enqueue_job("answer", _queue_name=config.queue, _job_id=config.prefix)
    assert job is not None
    worker = ReplayWorker(
        functions=[func(answer, name="answer", keep_result=60)],
        queue_name=config.queue,
        redis_pool=pool,
        burst=True,
        handle_signals=False,
    )
    try:
        await worker.main()
        assert await job.result(timeout=5) == 42  # arq's finish kept the result
    finally:
        await worker.close()
        await pool.aclose()


def test_finish_job_takes_the_arguments_arq_passes() -> None:
    # ReplayWorker.finish_job restates arq's (0.26 to 0.28): a new arq must fail here.
    ours = inspect.signature(ReplayWorker.finish_job).parameters
    arqs = inspect.signature(Worker.finish_job).parameters
    assert list(ours) == list(arqs)
    # run_job: arq's, and what the take read of the job (which arq never passes).
    ours_run = inspect.signature(ReplayWorker.run_job).parameters
    assert list(ours_run) == [*inspect.signature(Worker.run_job).parameters, "read"]
    assert ours_run["read"].default is None
