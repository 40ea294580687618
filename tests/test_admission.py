"""Under attack: the queue cap, fair queueing, normalised keys, allowed hosts, bodies."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.backends.base import Job, QueueFull
from asgi_worker.backends.redis.clients import redis_client
from asgi_worker.backends.redis.queue import ArqQueue
from asgi_worker.core.keys import RedisKeys, snapshot_from_scope
from asgi_worker.core.normalize import KeyRules, normalize_percent
from asgi_worker.testing import run_pending

from .helpers import make_config

BACKENDS = ["memory", "redis"]


def backend_config(kind: str, prefix: str, **overrides: Any) -> Config:
    if kind == "memory":
        return Config(redis_url="memory://", prefix=prefix, **overrides)
    return make_config(prefix, **overrides)


def echo_app(config: Config, runs: Counter[str]) -> Starlette:
    async def echo(request: Request) -> Response:
        runs[request.url.path] += 1
        body = await request.body()
        return JSONResponse(
            {"query": request.url.query, "host": request.headers.get("host"), "body": len(body)}
        )

    app = Starlette(routes=[Route("/{path:path}", echo)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


async def call(app: Starlette, method: str, url: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, url, **kwargs)


# --- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"a=%31", b"a=1"),
        (b"a=%7e%7E", b"a=~~"),
        (b"a=%2f", b"a=%2F"),
        (b"a=%e2%9c%93", b"a=%E2%9C%93"),
        (b"a=100%", b"a=100%"),  # not an escape: left as it is
        (b"a=%zz", b"a=%zz"),
        (b"%41%42=1", b"AB=1"),
    ],
)
def test_percent_encoding_is_normalised_as_rfc_3986_says(raw: bytes, canonical: bytes) -> None:
    assert normalize_percent(raw) == canonical


RULES = KeyRules.from_config(
    Config(redis_url="memory://", ignore_params=("utm_*", "fbclid", "gclid"), sort_query=True)
)


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        (b"b=2&a=1", b"a=1&b=2"),
        (b"a=1&", b"a=1"),
        (b"&&a=1&&b=2&", b"a=1&b=2"),
        (b"a=%31&utm_source=x&fbclid=y&utm_medium=z&gclid=q", b"a=1"),
        (b"t=2&s=1&t=1", b"s=1&t=2&t=1"),  # repeated names keep their order
        (b"utm%5Fsource=x&a=1", b"a=1"),  # matched after decoding
        (b"utm=1", b"utm=1"),
        (b"", b""),
    ],
)
def test_query_rules_drop_ignored_params_and_sort(query: bytes, canonical: bytes) -> None:
    assert RULES.query(query) == canonical


def test_defaults_keep_order_and_every_param() -> None:
    assert KeyRules().query(b"b=2&utm_source=x&a=%31&") == b"b=2&utm_source=x&a=1"


def scope(query: bytes, host: bytes = b"example.com") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/page",
        "raw_path": b"/p%61ge",
        "query_string": query,
        "headers": [(b"host", host)],
    }


def test_spellings_of_one_page_share_one_key() -> None:
    spellings = [
        b"id=1&lang=en",
        b"lang=en&id=1",
        b"id=1&lang=en&utm_source=news",
        b"id=1&lang=en&fbclid=abc",
        b"id=1&lang=en&",
        b"id=%31&lang=en",
        b"lang=en&id=1&gclid=z&utm_campaign=q",
    ]
    digests = {snapshot_from_scope(scope(q), (), None, RULES).digest for q in spellings}
    assert len(digests) == 1
    snapshot = snapshot_from_scope(scope(spellings[-1]), (), None, RULES)
    assert (snapshot.query_string, snapshot.raw_path) == (b"id=1&lang=en", b"/page")
    hosts = [b"example.com", b"EXAMPLE.COM", b"example.com.", b"example.com:80", b"Example.Com:80"]
    assert len({snapshot_from_scope(scope(b"", h), (), None, RULES).digest for h in hosts}) == 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_the_app_sees_what_was_keyed(kind: str, prefix: str, redis: Redis) -> None:
    runs: Counter[str] = Counter()
    config = backend_config(kind, prefix, ignore_params=("utm_*",), sort_query=True)
    app = echo_app(config, runs)
    assert (await call(app, "GET", "/q?b=2&utm_source=x&a=%31&")).status_code == 202
    assert await run_pending(app) == 1
    for spelling in ("/q?a=1&b=2", "/q?b=2&a=1&utm_medium=y"):
        hit = await call(app, "GET", spelling)
        assert hit.headers["cache-status"] == "asgi-worker; hit"
        assert hit.json()["query"] == "a=1&b=2"
    assert runs["/q"] == 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_allowed_hosts_refuse_others_with_400_and_no_job(
    kind: str, prefix: str, redis: Redis
) -> None:
    runs: Counter[str] = Counter()
    config = backend_config(kind, prefix, allowed_hosts=("example.com", "*.example.org"))
    app = echo_app(config, runs)
    for host in ("evil.test", "example.com.evil.test", "example.org"):
        refused = await call(app, "GET", "/h", headers={"host": host})
        assert (refused.status_code, refused.text) == (400, "Bad Request: host not served")
    assert await run_pending(app) == 0
    for host in ("example.com", "EXAMPLE.com:80", "a.example.org", "b.a.example.org:8080"):
        assert (await call(app, "GET", "/h", headers={"host": host})).status_code == 202, host
    assert await run_pending(app) == 3  # example.com in two spellings is one entry
    assert runs["/h"] == 3


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_get_with_a_body_goes_to_the_app(kind: str, prefix: str, redis: Redis) -> None:
    runs: Counter[str] = Counter()
    app = echo_app(backend_config(kind, prefix), runs)
    first = await call(app, "GET", "/b", content=b"one body")
    second = await call(app, "GET", "/b", content=b"another, longer body")
    assert [first.json()["body"], second.json()["body"]] == [8, 20]
    assert "cache-status" not in first.headers
    assert await run_pending(app) == 0

    # Chunked (no length): the same.
    async def chunks() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    chunked = await call(app, "GET", "/b", content=chunks())
    assert chunked.json()["body"] == 2
    assert runs["/b"] == 3
    # An explicit empty body is a plain GET.
    assert (await call(app, "GET", "/b", headers={"content-length": "0"})).status_code == 202


# --- the queue cap --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_full_queue_answers_503_and_leaves_no_claim(
    kind: str, prefix: str, redis: Redis
) -> None:
    runs: Counter[str] = Counter()
    # In process, max_jobs run and max_queued more wait; on Redis, max_queued are queued.
    config = backend_config(kind, prefix, max_queued=2, max_jobs=1, fair_queueing=False)
    app = echo_app(config, runs)
    statuses = [(await call(app, "GET", f"/f?n={n}")).status_code for n in range(5)]
    expected_accepted = 3 if kind == "memory" else 2
    assert statuses == [202] * expected_accepted + [503] * (5 - expected_accepted)
    full = await call(app, "GET", "/f?n=4")
    assert full.headers["cache-status"] == "asgi-worker; fwd=uri-miss; detail=queue-full"
    assert (full.headers["retry-after"], full.headers["cache-control"]) == ("1", "no-store")
    if kind == "redis":
        keys = RedisKeys(prefix)
        digest = snapshot_from_scope(
            {
                "type": "http",
                "scheme": "http",
                "path": "/f",
                "query_string": b"n=4",
                "headers": [(b"host", b"testserver")],
            },
            (),
        ).digest
        assert await redis.exists(keys.claim(digest)) == 0  # released: no lease to wait out
    # Hits and misses already queued are unaffected: run the queue, they are served.
    assert await run_pending(app) == expected_accepted
    assert (await call(app, "GET", "/f?n=0")).status_code == 200
    assert (await call(app, "GET", "/f?n=4")).status_code == 202  # room again


async def test_a_full_queue_still_serves_a_stale_copy(prefix: str, redis: Redis) -> None:
    runs: Counter[str] = Counter()
    config = make_config(prefix, ttl=1, stale_ttl=30, min_ttl=0, max_queued=1, fair_queueing=False)
    app = echo_app(config, runs)
    assert (await call(app, "GET", "/s")).status_code == 202
    assert await run_pending(app) == 1
    assert (await call(app, "GET", "/other")).status_code == 202  # the queue is now full
    await asyncio.sleep(1.1)
    stale = await call(app, "GET", "/s")
    assert (stale.status_code, stale.headers["cache-status"]) == (
        200,
        "asgi-worker; hit; fwd=stale",
    )


# --- fair queueing ----------------------------------------------------------------------------


async def test_a_flooded_path_is_spread_and_other_paths_are_due_at_once(
    prefix: str, redis: Redis
) -> None:
    config = make_config(prefix, max_jobs=10)
    client = redis_client(config.redis_url, config)
    keys = RedisKeys(prefix)
    # The flooded path's jobs take 1 s (as the commit script would have recorded).
    await redis.hset(keys.durations("/flood"), "/flood", 1000)
    queue = ArqQueue(
        client, queue_name=config.queue, expires=90, prefix=prefix, fair_slots=10, horizon=2.0
    )

    def job(path: str, n: int) -> Job:
        return Job(f"{prefix}:{path}:{n}", b"x", "t", 0.0, path)

    due: list[float] = []
    refused = 0
    began = time.monotonic()
    for n in range(40):
        try:
            await queue.enqueue(job("/flood", n))
        except QueueFull:
            refused += 1
    took = time.monotonic() - began
    scores = [score for _, score in await redis.zrange(config.queue, 0, -1, withscores=True)]
    due = sorted(scores)
    # 100 ms apart (1 s over 10 slots), up to the 2 s horizon: 21 queued, the rest refused;
    # on a machine so busy that the enqueues took longer, the horizon moved on with them.
    more = int(took / 0.1)
    assert 21 <= len(due) <= 21 + more, (len(due), took)
    assert refused == 40 - len(due)
    gaps = [b - a for a, b in itertools.pairwise(due)]
    assert all(95 <= gap <= 105 for gap in gaps), gaps
    before = time.time() * 1000
    await queue.enqueue(job("/cold", 0))
    cold = await redis.zscore(config.queue, f"{prefix}:/cold:0")
    assert cold is not None
    assert cold <= time.time() * 1000 + 1  # due at once: nothing of /flood is ahead of it
    assert cold < due[2]
    assert before - 5 <= cold
    await client.aclose(close_connection_pool=True)
    await redis.delete(config.queue, *[f"arq:job:{prefix}:/flood:{n}" for n in range(40)])


async def test_a_shorter_typical_duration_retimes_the_backlog(prefix: str, redis: Redis) -> None:
    config = make_config(prefix)
    client = redis_client(config.redis_url, config)
    keys = RedisKeys(prefix)
    await redis.hset(keys.durations("/p"), "/p", 1000)
    queue = ArqQueue(
        client, queue_name=config.queue, expires=90, prefix=prefix, fair_slots=10, horizon=30.0
    )
    for n in range(10):
        await queue.enqueue(Job(f"{prefix}:a{n}", b"x", "t", 0.0, "/p"))
    # The path turns out fast: 10 ms jobs. The backlog ahead is re-timed at 1 ms spacing.
    await redis.hset(keys.durations("/p"), "/p", 10)
    now = time.time() * 1000
    await queue.enqueue(Job(f"{prefix}:b", b"x", "t", 0.0, "/p"))
    score = await redis.zscore(config.queue, f"{prefix}:b")
    assert score is not None
    assert score - now < 50  # 10 jobs ahead at 1 ms, not 1 s at 100 ms
    await client.aclose(close_connection_pool=True)


def test_config_checks_the_new_fields() -> None:
    from asgi_worker import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_queued"):
        Config(max_queued=-1)
    with pytest.raises(ConfigurationError, match="ignore_params"):
        Config(ignore_params="utm_*")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="allowed_hosts"):
        Config(allowed_hosts=("",))
    assert Config(allowed_hosts=(" Example.COM. ",)).allowed_hosts == ("example.com",)
    assert dataclasses.replace(Config(), max_queued=0).max_queued == 0
