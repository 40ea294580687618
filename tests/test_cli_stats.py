"""`asgi-worker stats` and `collect_stats` against real Redis and real arq workers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import httpx
from click.testing import CliRunner
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, ReplayWorker, WorkerMiddleware, worker_settings
from asgi_worker.cli.commands import main
from asgi_worker.core.keys import RedisKeys
from asgi_worker.observability.stats import Stats, collect_stats

from .conftest import REDIS_URL


def gated_app(config: Config, gate: asyncio.Event, inside: asyncio.Event) -> Starlette:
    """`/slow/...` waits for `gate`; everything else answers at once."""

    async def answer(request: Request) -> Response:
        if request.url.path.startswith("/slow"):
            inside.set()
            await gate.wait()
        return PlainTextResponse(request.url.path)

    app = Starlette(routes=[Route("/{path:path}", answer)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


async def get(app: Starlette, url: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return (await http.get(url)).status_code


def run(config: Config, *arguments: str, redis_url: str = REDIS_URL) -> tuple[int, str]:
    env = {"ASGI_WORKER_REDIS_URL": redis_url, "ASGI_WORKER_PREFIX": config.prefix}
    result = CliRunner().invoke(main, ["stats", *arguments], env=env)
    return result.exit_code, result.output


async def test_stats_follow_jobs_from_queued_to_running_to_stored(
    config: Config, redis: Redis
) -> None:
    config = dataclasses.replace(config, adaptive_retry_after=True)
    gate, inside = asyncio.Event(), asyncio.Event()
    app = gated_app(config, gate, inside)
    # A cache whose prefix merely starts with ours: none of its keys or jobs count.
    neighbour = dataclasses.replace(config, prefix=config.prefix + "-more")
    assert await get(gated_app(neighbour, gate, inside), "/a") == 202

    empty = await collect_stats(config, redis, redis)
    assert dataclasses.replace(empty, seconds=0.0) == Stats(0, 0, 0, 0, 0, 0, (), None, 0.0)

    for url in ("/a", "/b", "/slow/c"):
        assert await get(app, url) == 202
    queued = await collect_stats(config, redis, redis)
    assert (queued.claims, queued.queued, queued.running, queued.stored) == (3, 3, 0, 0)
    assert queued.paths == 0  # a job lists its path as it starts (prefix invalidation)

    worker = ReplayWorker(**worker_settings(app, config), burst=True, handle_signals=False)
    draining = asyncio.create_task(worker.main())
    try:
        await asyncio.wait_for(inside.wait(), 10)
        await asyncio.sleep(0.1)  # the two quick jobs end meanwhile
        running = await collect_stats(config, redis, redis)
        gate.set()
        await asyncio.wait_for(draining, 10)
    finally:
        gate.set()
        await worker.close()
    assert (running.claims, running.queued, running.running, running.stored) == (1, 1, 1, 2)
    assert running.paths == 3  # the running job's path too
    assert running.worker_health is not None
    assert "j_complete=" in running.worker_health  # arq's own words

    done = await collect_stats(config, redis, redis)
    assert (done.stored, done.fresh, done.claims, done.queued, done.running) == (3, 3, 0, 0, 0)
    assert {path for path, _ in done.slowest} == {"/a", "/b", "/slow/c"}
    assert done.slowest[0][0] == "/slow/c"
    assert done.slowest[0][1] >= 0.1
    assert done.worker_health is None  # arq deletes its report when the worker closes


async def test_stats_command_prints_the_counts_and_json(config: Config, redis: Redis) -> None:
    app = gated_app(config, asyncio.Event(), asyncio.Event())
    assert await get(app, "/a") == 202

    code, text = await asyncio.to_thread(run, config)
    assert code == 0, text
    assert f"cache {config.prefix!r} at {REDIS_URL}" in text
    assert "claims held       1" in text
    assert "jobs queued       1 (running: 0)" in text
    assert "no current report" in text

    code, text = await asyncio.to_thread(run, config, "--json")
    assert code == 0, text
    found = json.loads(text)
    assert (found["claims"], found["queued"], found["stored"]) == (1, 1, 0)


def test_stats_command_refuses_memory_backend(config: Config) -> None:
    code, text = run(config, redis_url="memory://")
    assert code == 2
    assert "memory:// lives inside the web process" in text


def test_stats_command_reports_redis_down_without_its_password(config: Config) -> None:
    url = "redis://admin:hunter2@127.0.0.1:1/0"
    env = {"ASGI_WORKER_REDIS_URL": url, "ASGI_WORKER_REDIS_TIMEOUT": "0.5"}
    result = CliRunner().invoke(main, ["stats"], env=env)
    assert result.exit_code == 1
    assert "Redis at redis://admin:***@127.0.0.1:1/0" in result.output
    assert "hunter2" not in result.output


def test_plain_stats_says_no_config_was_given_and_how_to_give_one(prefix: str) -> None:
    # No --app, no --config, no ASGI_WORKER_* variable: the defaults' cache, said on stderr.
    unset: dict[str, str | None] = {n: None for n in os.environ if n.startswith("ASGI_WORKER_")}
    result = CliRunner().invoke(main, ["stats", "--json"], env=unset)
    assert result.stderr.startswith("asgi-worker: no config given"), result.output
    for said in (
        "(no --app, --config or ASGI_WORKER_* variable)",
        "the default cache: prefix 'aw' at redis://127.0.0.1:6379/0.",
        "pass --app MODULE:APP (the app you serve), --config MODULE:CONFIG, or set "
        "ASGI_WORKER_* variables.",
    ):
        assert said in result.stderr
    if result.exit_code == 0:  # a Redis on the default port (not so under `nox -s valkey`)
        assert "stored" in json.loads(result.stdout)  # stdout stays one JSON object

    env = {"ASGI_WORKER_REDIS_URL": REDIS_URL, "ASGI_WORKER_PREFIX": prefix}
    given = CliRunner().invoke(main, ["stats", "--json"], env=env)
    assert given.exit_code == 0, given.output
    assert given.stderr == ""


async def test_scan_patterns_match_this_prefix_only(prefix: str, redis: Redis) -> None:
    # Real Redis glob matching, with neighbours whose prefix starts with ours.
    digest = "0123456789abcdef" * 2
    names = {p: RedisKeys(p) for p in (prefix, f"{prefix}-more", f"{prefix}:x", f"{prefix}\\")}
    for keys in names.values():
        for key in (keys.response(digest), keys.fresh(digest), keys.claim(digest)):
            await redis.set(key, b"1", px=60_000)
        await redis.set(keys.job_id(digest, "t0"), b"1", px=60_000)
    for p, keys in names.items():
        requests = {k async for k in redis.scan_iter(match=keys.requests_pattern())}
        mine = {keys.response(digest), keys.fresh(digest), keys.claim(digest)}
        assert requests == {key.encode() for key in mine}, p
        jobs = {k async for k in redis.scan_iter(match=keys.job_ids_pattern())}
        assert jobs == {keys.job_id(digest, "t0").encode()}, p
