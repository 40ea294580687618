"""Fault injection: Redis down, failing apps in the worker, corrupt entries in Redis."""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import msgpack
import pytest
from redis.asyncio import Redis

from asgi_worker import Config
from asgi_worker.core.codec import StoredResponse, encode_response

from .helpers import (
    SECRET,
    build_app,
    claim_key,
    digest_of,
    make_config,
    queued,
    response_key,
    serve,
    wait_until_gone,
)
from .test_integration import run_worker

CLOSED_PORT_URL = "redis://127.0.0.1:1/0"


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "asgi_worker" and r.levelno >= logging.ERROR]


# --- Redis unreachable -----------------------------------------------------------------------


async def test_redis_down_answers_503_with_retry_after(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(prefix, redis_url=CLOSED_PORT_URL, redis_timeout=0.2, retry_after=7)
    calls: Counter[str] = Counter()
    with caplog.at_level(logging.ERROR, logger="asgi_worker"):
        async with serve(build_app(config, calls)) as http:
            response = await http.get("/echo")
            head = await http.head("/echo")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.headers["cache-control"] == "no-store"
    assert response.text == "Service Unavailable"
    assert head.status_code == 503
    assert head.content == b""
    assert calls["/echo"] == 0
    logged = errors(caplog)
    assert len(logged) == 2
    assert all("cache backend unavailable" in r.getMessage() for r in logged)


async def test_redis_down_with_fail_open_lets_the_app_answer(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(prefix, redis_url=CLOSED_PORT_URL, redis_timeout=0.2, fail_open=True)
    calls: Counter[str] = Counter()
    with caplog.at_level(logging.ERROR, logger="asgi_worker"):
        async with serve(build_app(config, calls)) as http:
            response = await http.get("/echo?x=1")
    assert response.status_code == 200
    assert response.json()["query"] == "x=1"
    assert "cache-status" not in response.headers
    assert calls["/echo"] == 1
    assert [
        r.getMessage().startswith("asgi-worker: cache backend unavailable") for r in errors(caplog)
    ] == [True]


# --- failures inside the job -----------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    path: str
    status: int
    body: bytes
    log: str
    traceback: bool = False


FAULTS = [
    Fault("/boom", 500, b"Internal Server Error", "/boom raised", traceback=True),
    Fault("/slow", 504, b"Gateway Timeout", "took longer than job_timeout=0.2s"),
    Fault("/big", 502, b"Response Too Large", "body exceeds max_body_bytes=1000"),
    Fault("/bad", 502, b"Bad Gateway", "gave an invalid response"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.path.strip("/") for f in FAULTS])
async def test_failing_job_stores_short_lived_error(
    prefix: str, redis: Redis, caplog: pytest.LogCaptureFixture, fault: Fault
) -> None:
    config = make_config(prefix, error_ttl=1.0, job_timeout=0.2, max_body_bytes=1000)
    calls: Counter[str] = Counter()
    app = build_app(config, calls, slow_seconds=5.0, big_bytes=4096)
    digest = await digest_of(config, fault.path)
    async with serve(app) as http:
        assert (await http.get(fault.path)).status_code == 202
        assert await redis.exists(claim_key(config, digest)) == 1

        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            assert await run_worker(app, config) == 1
        assert calls[fault.path] == 1
        assert await redis.exists(claim_key(config, digest)) == 0  # released, not stuck

        stored = await http.get(fault.path)
        pttl = await redis.pttl(response_key(config, digest))
        assert stored.status_code == fault.status
        assert stored.content == fault.body
        assert stored.headers["content-type"] == "text/plain; charset=utf-8"
        assert stored.headers["cache-status"] == "asgi-worker; hit"
        assert SECRET not in stored.text
        assert SECRET not in str(stored.headers)
        assert 0 < pttl <= 1000

        logged = errors(caplog)
        assert len(logged) == 1
        assert fault.log in logged[0].getMessage()
        if fault.traceback:
            assert logged[0].exc_info is not None
            assert "Traceback" in caplog.text
            assert SECRET in caplog.text  # the detail is in the log, only there

        # After error_ttl the entry is gone and the next GET claims and enqueues again.
        await wait_until_gone(redis, response_key(config, digest))
        assert await queued(redis, config) == 0
        again = await http.get(fault.path)
    assert again.status_code == 202
    assert await queued(redis, config) == 1
    assert await redis.exists(claim_key(config, digest)) == 1


# --- corrupt entries -------------------------------------------------------------------------

CORRUPT = {
    "random-bytes": b"\x00\xffnot msgpack at all\xc1",
    "wrong-shape": msgpack.packb({"status": 200}),
    "wrong-version": msgpack.packb([9, 200, [], b"x", 1.0], use_bin_type=True),
    "truncated": encode_response(StoredResponse(200, (), b"payload", 1.0))[:-4],
}


@pytest.mark.parametrize("data", CORRUPT.values(), ids=CORRUPT.keys())
async def test_corrupt_entry_is_a_logged_miss_then_refilled(
    config: Config, redis: Redis, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    digest = await digest_of(config, "/echo?c=1")
    await redis.set(response_key(config, digest), data, px=60_000)
    async with serve(app) as http:
        with caplog.at_level(logging.ERROR, logger="asgi_worker"):
            miss = await http.get("/echo?c=1")
        assert miss.status_code == 202
        assert miss.headers["cache-status"] == "asgi-worker; fwd=uri-miss"
        logged = errors(caplog)
        assert len(logged) == 1
        assert f"discarding corrupt entry {digest}" in logged[0].getMessage()
        assert await redis.exists(response_key(config, digest)) == 0
        assert await redis.exists(claim_key(config, digest)) == 1
        assert await queued(redis, config) == 1

        assert await run_worker(app, config) == 1
        assert await redis.exists(claim_key(config, digest)) == 0
        hit = await http.get("/echo?c=1")
    assert hit.status_code == 200
    assert hit.json()["query"] == "c=1"
    assert calls["/echo"] == 1


@pytest.mark.parametrize("stored_at", [math.nan, math.inf], ids=["nan", "inf"])
async def test_entry_with_non_finite_stored_at_is_a_miss(
    config: Config, redis: Redis, stored_at: float
) -> None:
    # Foreign bytes that decode_response accepts; serving them computes int(now - stored_at).
    digest = await digest_of(config, "/echo?n=1")
    data = msgpack.packb([1, 200, [], b"foreign", stored_at, False], use_bin_type=True)
    await redis.set(response_key(config, digest), data, px=60_000)
    async with serve(build_app(config)) as http:
        response = await http.get("/echo?n=1")
    assert response.status_code == 202
