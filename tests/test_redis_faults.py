"""Redis taken away: down, crashed and restarted empty, frozen. Each test runs its own
redis-server (tests/own_redis.py) on a free loopback port and stops it itself.

What must hold (docs/failure-modes.md): Redis down is a `503` with
`Retry-After` and an error in the log (or the app's own answer with `fail_open=True`);
and once Redis is back, the same app object serves again, with no restart of anything.
A restart that loses the claims and the queue must not leave a URL at `202` forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from asgi_worker.backends.base import Committed, Write
from asgi_worker.backends.redis.store import RedisStore
from asgi_worker.core.keys import RedisKeys
from asgi_worker.testing import run_pending

from .helpers import build_app, claim_key, digest_of, make_config, serve
from .own_redis import OwnRedis, own_redis
from .stack import get_until_ready, running_stack


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "asgi_worker" and record.levelno >= logging.ERROR
    ]


async def answer_after_restart(http: httpx.AsyncClient, url: str) -> httpx.Response:
    """The first answer that is not a 503 (a few tries: stale pooled connections)."""
    for _ in range(5):
        response = await http.get(url)
        if response.status_code != 503:
            return response
    return response


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OwnRedis]:
    """Our own redis-server, not started yet."""
    with own_redis(tmp_path, started=False) as own:
        yield own


@pytest.mark.parametrize("history", ["never-up", "crashed"])
async def test_redis_down_is_503_then_the_same_app_serves_once_it_is_back(
    prefix: str, server: OwnRedis, caplog: pytest.LogCaptureFixture, history: str
) -> None:
    config = make_config(prefix, redis_url=server.url, redis_timeout=0.5, retry_after=3)
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    async with serve(app) as http:
        if history == "crashed":
            # The pool holds live connections when Redis dies under it.
            server.start()
            assert (await http.get("/echo?warm=1")).status_code == 202
            server.kill()

        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            started = time.monotonic()
            down = await http.get("/echo?r=1")
            head = await http.head("/echo?r=1")
        assert time.monotonic() - started < 5
        assert down.status_code == 503
        assert down.headers["retry-after"] == "3"
        assert down.headers["cache-control"] == "no-store"
        assert down.text == "Service Unavailable"
        assert (head.status_code, head.content) == (503, b"")
        logged = errors(caplog)
        assert len(logged) == 2
        assert all("cache backend unavailable" in message for message in logged)
        assert calls["/echo"] == 0

        # Back on the same port, empty. Same app, same middleware, same pool.
        server.start()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            back = await http.get("/echo?r=1")
        assert back.status_code == 202
        assert errors(caplog) == []
        redis = server.client()
        assert redis.zcard(config.queue) == 1
        assert await run_pending(app) == 1
        served = await http.get("/echo?r=1")
    assert served.status_code == 200
    assert served.headers["cache-status"] == "asgi-worker; hit"
    assert served.json()["query"] == "r=1"
    assert calls["/echo"] == 1
    redis.close()


async def test_fail_open_lets_the_app_answer_then_caches_once_redis_is_back(
    prefix: str, server: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(prefix, redis_url=server.url, redis_timeout=0.5, fail_open=True)
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    async with serve(app) as http:
        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            direct = await http.get("/echo?f=1")
        assert direct.status_code == 200
        assert direct.json()["query"] == "f=1"
        assert "cache-status" not in direct.headers
        assert calls["/echo"] == 1
        assert [m.startswith("asgi-worker: cache backend unavailable") for m in errors(caplog)] == [
            True
        ]

        server.start()
        assert (await http.get("/echo?f=1")).status_code == 202  # through the cache again
        assert calls["/echo"] == 1
        assert await run_pending(app) == 1
        cached = await http.get("/echo?f=1")
    assert cached.status_code == 200
    assert cached.headers["cache-status"] == "asgi-worker; hit"
    assert calls["/echo"] == 2


async def test_restart_losing_a_pending_job_reclaims_and_enqueues_again(
    prefix: str, server: OwnRedis
) -> None:
    config = make_config(prefix, redis_url=server.url, redis_timeout=0.5)
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    digest = await digest_of(config, "/echo?p=1")
    server.start()
    redis = server.client()
    try:
        async with serve(app) as http:
            assert (await http.get("/echo?p=1")).status_code == 202
            assert (await http.get("/echo?p=1")).status_code == 202
            assert redis.zcard(config.queue) == 1  # one job, no worker running
            assert redis.exists(claim_key(config, digest)) == 1

            server.kill()  # claims, queue and job gone with it
            server.start()
            redis.close()
            redis = server.client()
            assert redis.dbsize() == 0

            # (The first request on a stale pooled connection may be a 503: see
            # test_first_request_after_a_redis_restart_is_served below.)
            again = await answer_after_restart(http, "/echo?p=1")
            assert again.status_code == 202
            assert redis.zcard(config.queue) == 1  # re-claimed and re-enqueued at once
            assert redis.exists(claim_key(config, digest)) == 1
            assert (await http.get("/echo?p=1")).status_code == 202
            assert redis.zcard(config.queue) == 1  # and only once

            assert await run_pending(app) == 1
            served = await http.get("/echo?p=1")
        assert served.status_code == 200
        assert served.json()["query"] == "p=1"
        assert calls["/echo"] == 1
    finally:
        redis.close()


async def test_frozen_redis_is_503_within_redis_timeout_and_recovers_within_the_lease(
    prefix: str, server: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # SIGSTOP: the TCP connection stays open and the kernel still accepts the command,
    # but nothing answers. The client must give up after redis_timeout, not hang.
    config = make_config(
        prefix, redis_url=server.url, redis_timeout=0.5, job_timeout=1, claim_ttl=2
    )
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    server.start()
    async with serve(app) as http:
        assert (await http.get("/stream")).status_code == 202  # connections in the pool
        server.pause()
        try:
            with caplog.at_level(logging.ERROR, logger="asgi_worker"):
                started = time.monotonic()
                frozen = await http.get("/echo?z=1")
                waited = time.monotonic() - started
        finally:
            server.resume()
        assert frozen.status_code == 503
        assert frozen.headers["retry-after"] == "1"
        assert waited < 0.5 + 1.5
        assert any("cache backend unavailable" in message for message in errors(caplog))

        # The frozen Redis ran the timed-out lookup when it woke up, so it may hold a
        # claim whose job was never enqueued: 202 until that lease (claim_ttl) runs out,
        # never longer.
        deadline = time.monotonic() + config.claim_lease + 3
        while (response := await http.get("/echo?z=1")).status_code == 202:
            assert time.monotonic() < deadline, "still 202 after claim_ttl + 3 s"
            await run_pending(app)
            await asyncio.sleep(0.1)
        assert response.status_code == 200
        assert response.json()["query"] == "z=1"
    assert calls["/echo"] == 1


async def test_first_request_after_a_redis_restart_is_served(
    prefix: str, server: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis restarts (a deploy, a failover) between two requests: nothing was down at
    # request time, so no client should see a 503. The pool still holds connections to
    # the old process; the first command on each of them fails.
    config = make_config(prefix, redis_url=server.url, redis_timeout=0.5)
    app = build_app(config)
    server.start()
    async with serve(app) as http:
        warm = await asyncio.gather(*(http.get(f"/echo?warm={n}") for n in range(4)))
        assert {response.status_code for response in warm} == {202}
        server.kill()
        server.start()
        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            after = [await http.get(f"/echo?after={n}") for n in range(4)]
    assert [response.status_code for response in after] == [202] * 4, errors(caplog)
    assert errors(caplog) == []


@pytest.mark.e2e
async def test_worker_process_survives_a_redis_restart(
    prefix: str, server: OwnRedis, tmp_path: Path
) -> None:
    # uvicorn and `asgi-worker worker` on our own Redis; Redis restarts (empty) under
    # both. The web side recovers by itself (tests above); the worker must too, or
    # nothing is ever served again until someone restarts it.
    server.start()
    with running_stack(prefix, tmp_path, redis_url=server.url) as stack:
        async with stack.client() as http:
            assert (await http.get("/hang?n=1")).status_code == 202
            first = await get_until_ready(http, "/hang?n=1", within=10)
            assert first.status_code == 200

            server.kill()
            await asyncio.sleep(0.5)
            server.start()

            for _ in range(50):  # the web side answers again at once
                if (await http.get("/hang?n=2")).status_code == 202:
                    break
                await asyncio.sleep(0.1)
            deadline = time.monotonic() + 10
            while (response := await http.get("/hang?n=2")).status_code == 202:
                if time.monotonic() > deadline or stack.worker.poll() is not None:
                    break
                await asyncio.sleep(0.1)
        worker = stack.worker
        assert worker.poll() is None, (
            f"the worker exited with {worker.returncode} when Redis restarted\n{stack.logs()}"
        )
        assert response.status_code == 200, stack.logs()
        assert response.json()["pid"] == worker.pid


async def test_a_commit_on_its_own_sends_the_path_hint_and_survives_a_script_flush(
    server: OwnRedis, prefix: str
) -> None:
    # What `arq module.WorkerSettings` and in-process jobs send (no ReplayWorker to carry
    # the commit): the commit script and the path list's hint, in one pipeline; without
    # the script, the commit loads it.
    server.start()
    redis = Redis.from_url(server.url)
    store = RedisStore(redis, prefix=prefix, claim_ttl=30)
    keys = RedisKeys(prefix)
    entry = Write(b"entry", fresh=60.0, keep=120.0, path="/report", query=b"")
    for attempt in range(2):
        digest = f"0123abcd{attempt:024x}"
        claimed_at = (await store.lookup(digest, "t", "/report")).claimed_at
        assert claimed_at is not None
        await store.list_path("/report")
        await redis.script_flush()  # as after a restart: the commit script is gone
        assert await store.commit(digest, "t", claimed_at, entry) is Committed.STORED
        assert await redis.get(keys.response(digest)) == b"entry"
        due = await redis.zscore(keys.paths_by_expiry(), "/report")
        assert due is not None
        assert due > (time.time() + 100) * 1000  # the entry's end, not the lease's
    await redis.aclose()
