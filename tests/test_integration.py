"""Middleware + real Redis + a real arq Worker in burst mode."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import httpx
import pytest
from arq.constants import job_key_prefix
from arq.worker import create_worker
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.types import ASGIApp

from asgi_worker import Config, worker_settings
from asgi_worker.backends.redis.queue import deserialize, serialize
from asgi_worker.worker import settings as worker_module

from .apps import make_app


async def run_worker(app: Starlette, config: Config) -> int:
    """Run every queued job in a real arq worker; return how many completed."""
    worker = create_worker(worker_settings(app, config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker.jobs_complete


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def test_miss_then_job_then_hit(config: Config, redis: Redis) -> None:
    calls: Counter[str] = Counter()
    app = make_app(config, calls)
    async with client(app) as http:
        first = await http.get("/echo?a=1")
        assert first.status_code == 202
        assert first.headers["retry-after"] == "1"
        assert first.headers["cache-control"] == "no-store"
        assert first.headers["cache-status"] == "asgi-worker; fwd=uri-miss"
        assert first.content == b""
        assert calls["/echo"] == 0  # the web side never ran the endpoint

        assert await run_worker(app, config) == 1
        assert calls["/echo"] == 1

        second = await http.get("/echo?a=1")
    assert second.status_code == 200
    assert second.headers["cache-status"] == "asgi-worker; hit"
    assert second.headers["x-app"] == "echo"
    assert second.json() == {
        "path": "/echo",
        "query": "a=1",
        "host": "testserver",
        "headers": ["host"],
        "startup": True,
    }
    assert calls["/echo"] == 1


async def test_a_job_queued_in_the_earlier_format_still_runs(config: Config, redis: Redis) -> None:
    # Jobs queued by a web process of an earlier version carry (snapshot, token) only; a
    # worker of this version renews the claim itself before it runs them.
    calls: Counter[str] = Counter()
    app = make_app(config, calls)
    async with client(app) as http:
        assert (await http.get("/echo?old=1")).status_code == 202
        [job_id] = await redis.zrange(config.queue, 0, -1)
        job_key = job_key_prefix + job_id.decode()
        job = deserialize(await redis.get(job_key))
        assert len(job["a"]) == 3  # snapshot, token, claim time
        job["a"] = job["a"][:2]
        await redis.set(job_key, serialize(job), px=60_000)

        assert await run_worker(app, config) == 1
        assert calls["/echo"] == 1
        assert (await http.get("/echo?old=1")).status_code == 200


async def test_a_stop_lost_while_the_app_starts_still_stops_the_worker(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asgi-lifespan awaits the app's startup in asyncio.wait_for, which on Python 3.11 can
    # swallow a cancellation landing as the startup completes (CPython gh-86296). Here the
    # startup loses one on purpose: the worker must still stop, not poll on.
    entered = asyncio.Event()
    real_start = worker_module._start

    async def start_losing_a_cancellation(app: ASGIApp, config: Config) -> object:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(10)
        return await real_start(app, config)

    monkeypatch.setattr(worker_module, "_start", start_losing_a_cancellation)
    settings = worker_settings(make_app(config, Counter()), config)
    worker = create_worker(settings, handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        await entered.wait()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the worker polled on after it was told to stop"
        assert task.cancelled()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()  # runs the shutdown: the app's lifespan and the store close
