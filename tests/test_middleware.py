"""WorkerMiddleware with real Redis, httpx.ASGITransport and a real arq worker (burst)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis
from starlette.types import Message, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.core.codec import StoredResponse, encode_response
from asgi_worker.core.replay import REPLAY_EXTENSION

from .helpers import (
    build_app,
    claim_key,
    claim_keys,
    digest_of,
    fresh_key,
    make_config,
    queued,
    response_key,
    serve,
)
from .test_integration import run_worker


async def our_keys(redis: Redis, prefix: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]


# --- bypass rules ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_other_methods_reach_the_app(config: Config, redis: Redis, method: str) -> None:
    calls: Counter[str] = Counter()
    async with serve(build_app(config, calls)) as http:
        response = await http.request(method, "/post")
    assert response.status_code == 201
    assert response.text == f"{method} ran"
    assert "cache-status" not in response.headers
    assert calls["/post"] == 1
    assert await our_keys(redis, config.prefix) == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer token"}, {"Cookie": "session=abc"}, {"cookie": ""}],
    ids=["authorization", "cookie", "empty-cookie"],
)
async def test_credentials_reach_the_app(
    config: Config, redis: Redis, headers: dict[str, str]
) -> None:
    calls: Counter[str] = Counter()
    async with serve(build_app(config, calls)) as http:
        response = await http.get("/echo", headers=headers)
    assert response.status_code == 200
    assert response.json()["method"] == "GET"
    assert "cache-status" not in response.headers
    assert calls["/echo"] == 1
    assert await our_keys(redis, config.prefix) == []


@pytest.mark.parametrize(
    "overrides",
    [{"exclude": ("/echo",)}, {"exclude": ("/e*",)}, {"include": ("/api/*",)}],
    ids=["excluded", "excluded-glob", "not-included"],
)
async def test_path_rules_reach_the_app(
    prefix: str, redis: Redis, overrides: dict[str, Any]
) -> None:
    config = make_config(prefix, **overrides)
    calls: Counter[str] = Counter()
    async with serve(build_app(config, calls)) as http:
        response = await http.get("/echo")
    assert response.status_code == 200
    assert response.json()["path"] == "/echo"
    assert calls["/echo"] == 1
    assert await our_keys(redis, prefix) == []


async def test_included_path_goes_through_the_worker(prefix: str, redis: Redis) -> None:
    config = make_config(prefix, include=("/ec*",), exclude=("/echo/private",))
    calls: Counter[str] = Counter()
    async with serve(build_app(config, calls)) as http:
        response = await http.get("/echo")
    assert response.status_code == 202
    assert calls["/echo"] == 0
    assert await queued(redis, config) == 1


def recording_app() -> tuple[list[tuple[Scope, Receive, Send]], Any]:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    return seen, app


async def _receive() -> Message:
    return {"type": "websocket.connect"}


async def _send(message: Message) -> None:
    raise AssertionError("the middleware must not answer itself")


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "websocket", "path": "/echo", "headers": [], "query_string": b""},
        {
            "type": "http",
            "method": "GET",
            "scheme": "http",
            "path": "/echo",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "extensions": {REPLAY_EXTENSION: {}},
        },
        {
            "type": "http",
            "method": "OPTIONS",
            "scheme": "http",
            "path": "/echo",
            "query_string": b"",
            "headers": [],
        },
    ],
    ids=["websocket", "replay-marker", "options"],
)
async def test_scope_passes_untouched(config: Config, redis: Redis, scope: Scope) -> None:
    seen, inner = recording_app()
    original = dict(scope)
    await WorkerMiddleware(inner, config=config)(scope, _receive, _send)
    assert len(seen) == 1
    assert seen[0][0] is scope
    assert seen[0][0] == original
    assert seen[0][1] is _receive
    assert seen[0][2] is _send
    assert await our_keys(redis, config.prefix) == []


# --- HEAD ------------------------------------------------------------------------------------


async def test_head_miss_is_202_and_head_hit_has_length_but_no_body(
    config: Config, redis: Redis
) -> None:
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    async with serve(app) as http:
        miss = await http.head("/echo?h=1")
        assert miss.status_code == 202
        assert miss.headers["retry-after"] == "1"
        assert miss.content == b""
        assert await queued(redis, config) == 1
        assert calls["/echo"] == 0

        assert await run_worker(app, config) == 1
        head = await http.head("/echo?h=1")
        get = await http.get("/echo?h=1")
    assert calls["/echo"] == 1  # HEAD and GET share one entry, replayed once as GET
    assert get.status_code == 200
    assert get.json()["method"] == "GET"
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert int(head.headers["content-length"]) > 0
    assert head.headers["x-app"] == "echo"
    assert head.headers["cache-status"] == "asgi-worker; hit"


# --- dedup and leases ------------------------------------------------------------------------


async def test_concurrent_cold_gets_enqueue_one_job(config: Config, redis: Redis) -> None:
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    async with serve(app) as http:
        responses = await asyncio.gather(*(http.get("/echo?cold=1") for _ in range(50)))
        assert [r.status_code for r in responses] == [202] * 50
        assert await queued(redis, config) == 1
        assert len(await claim_keys(redis, config.prefix)) == 1
        assert calls["/echo"] == 0

        assert await run_worker(app, config) == 1
        assert calls["/echo"] == 1
        assert await claim_keys(redis, config.prefix) == []
        hits = await asyncio.gather(*(http.get("/echo?cold=1") for _ in range(10)))
    assert [r.status_code for r in hits] == [200] * 10
    assert calls["/echo"] == 1
    assert await queued(redis, config) == 0


async def test_expired_lease_lets_the_next_get_enqueue_again(prefix: str, redis: Redis) -> None:
    config = make_config(prefix, job_timeout=0.1, claim_ttl=0.3)
    digest = await digest_of(config, "/echo?lease=1")
    async with serve(build_app(config)) as http:
        assert (await http.get("/echo?lease=1")).status_code == 202
        first_token = await redis.get(claim_key(config, digest))
        assert first_token is not None
        assert 0 < await redis.pttl(claim_key(config, digest)) <= 300

        assert (await http.get("/echo?lease=1")).status_code == 202
        assert await queued(redis, config) == 1  # claim held: no second job

        await asyncio.sleep(0.45)
        assert await redis.exists(claim_key(config, digest)) == 0
        assert (await http.get("/echo?lease=1")).status_code == 202
    assert await queued(redis, config) == 2
    second_token = await redis.get(claim_key(config, digest))
    assert second_token is not None
    assert second_token != first_token


# --- vary ------------------------------------------------------------------------------------


async def test_vary_header_values_are_separate_entries_and_reach_the_replay(
    prefix: str, redis: Redis
) -> None:
    config = make_config(prefix, vary=("Accept-Language",))
    calls: Counter[str] = Counter()
    app = build_app(config, calls)
    async with serve(app) as http:
        for language in ("en", "de", "en"):
            response = await http.get("/echo", headers={"Accept-Language": language})
            assert response.status_code == 202
        assert await queued(redis, config) == 2

        assert await run_worker(app, config) == 2
        assert calls["/echo"] == 2
        english = await http.get(
            "/echo", headers={"Accept-Language": "en", "X-Forwarded-Host": "evil.example"}
        )
        german = await http.get("/echo", headers={"accept-language": "de"})
        missing = await http.get("/echo")
    assert english.status_code == 200
    assert german.status_code == 200
    # Only the host and the vary header reach the app, whatever else the client sent.
    assert english.json()["headers"] == {"host": "testserver", "accept-language": "en"}
    assert german.json()["headers"] == {"host": "testserver", "accept-language": "de"}
    assert missing.status_code == 202  # no Accept-Language is a third entry


# --- stored responses ------------------------------------------------------------------------


async def test_age_is_an_integer(config: Config, redis: Redis) -> None:
    app = build_app(config)
    async with serve(app) as http:
        assert (await http.get("/echo?age=1")).status_code == 202
        await run_worker(app, config)
        fresh = await http.get("/echo?age=1")

        digest = await digest_of(config, "/echo?age=2")
        old = StoredResponse(200, ((b"x-old", b"1"),), b"old body", time.time() - 42)
        await redis.set(response_key(config, digest), encode_response(old), px=60_000)
        await redis.set(fresh_key(config, digest), b"1", px=60_000)
        aged = await http.get("/echo?age=2")
    assert fresh.status_code == 200
    assert fresh.headers["age"].isdigit()
    assert 0 <= int(fresh.headers["age"]) <= 5
    assert aged.status_code == 200
    assert aged.content == b"old body"
    assert aged.headers["x-old"] == "1"
    assert aged.headers["age"] in {"42", "43"}
    assert aged.headers["cache-status"] == "asgi-worker; hit"


async def test_stored_5xx_is_kept_only_error_ttl(prefix: str, redis: Redis) -> None:
    config = make_config(prefix, ttl=60, error_ttl=2)
    app = build_app(config)
    async with serve(app) as http:
        assert (await http.get("/unavailable")).status_code == 202
        assert (await http.get("/echo?ok=1")).status_code == 202
        assert await run_worker(app, config) == 2
        failed = await http.get("/unavailable")
        ok = await http.get("/echo?ok=1")
    assert failed.status_code == 503
    assert failed.text == "app says 503"
    assert ok.status_code == 200
    error_pttl = await redis.pttl(response_key(config, await digest_of(config, "/unavailable")))
    ok_pttl = await redis.pttl(response_key(config, await digest_of(config, "/echo?ok=1")))
    assert 0 < error_pttl <= 2000
    assert 2000 < ok_pttl <= 60_000
