"""The ops dashboard (`asgi_worker.dashboard`) against real processes and a real Redis.

uvicorn serves `tests/dashboard_app.py` (the dashboard mounted at /ops, excluded from the
cache) and a real `asgi-worker worker` runs its jobs. Progress is written to the job's
progress hash by the test, as a worker reports it (`Progress.fields`). The `memory://`
backend is served in this process (its jobs run here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from asgi_worker import Config, WorkerMiddleware, report_progress
from asgi_worker.backends.memory import InProcessQueue
from asgi_worker.core.dashboard_session import SESSION_SECONDS, Sessions, same_origin
from asgi_worker.core.keys import RedisKeys
from asgi_worker.core.progress import Progress
from asgi_worker.dashboard import COOKIE, create_dashboard
from asgi_worker.observability.counts import (
    MINUTES_KEPT,
    Bucket,
    MinuteCounts,
    read_minutes,
    write_minutes,
)
from asgi_worker.observability.dashboard_counts import WRITE_AFTER, dashboard_observer
from asgi_worker.observability.dashboard_state import STATE_EVERY, RedisReader, _Reused
from asgi_worker.observability.recent_jobs import KEPT as RECENT_KEPT
from asgi_worker.observability.recent_jobs import RecentJob, push_jobs, read_jobs
from asgi_worker.testing import find_middleware

from .dashboard_stack import (
    APP,
    TOKEN,
    DashboardStack,
    dashboard_stack,
    environment,
    get_until_stored,
    wait_for,
)
from .processes import asgi_worker_command, free_port, processes
from .test_docs import docs_example

pytestmark = pytest.mark.e2e

BEARER = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardStack]:
    prefix = f"awtest-dash-{tmp_path_factory.mktemp('id').name[-6:]}"
    with dashboard_stack(prefix, tmp_path_factory.mktemp("dashboard")) as started:
        yield started


@pytest.fixture
def http(stack: DashboardStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        yield client


def sign_in(http: httpx.Client, stack: DashboardStack) -> str:
    """Sign in through the form; returns the session's CSRF token (from the page)."""
    response = http.post("/ops/login", data={"token": TOKEN}, headers={"origin": stack.base_url})
    assert response.status_code == 303, response.text
    page = http.get("/ops/")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert found, page.text
    return found.group(1)


def test_without_its_token_everything_is_401_and_nothing_is_stored(
    http: httpx.Client, stack: DashboardStack
) -> None:
    page = http.get("/ops/")
    assert page.status_code == 401
    assert 'name="token"' in page.text  # the sign-in form
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"}):
        state = http.get("/ops/api/state", headers=headers)
        assert state.status_code == 401, headers
        assert state.headers["cache-control"] == "no-store"
    forged = http.get("/ops/api/state", headers={"cookie": f"{COOKIE}=abc.123.def"})
    assert forged.status_code == 401
    refused = http.post("/ops/invalidate", data={"path": "/sleep/x", "confirm": "yes"})
    assert refused.status_code == 401


def test_the_bearer_token_reads_the_state_never_cached(
    http: httpx.Client, stack: DashboardStack
) -> None:
    first = http.get("/ops/api/state", headers=BEARER)
    second = http.get("/ops/api/state", headers=BEARER)
    for response in (first, second):
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        assert "cache-status" not in response.headers  # excluded: the cache never saw it
        assert response.headers["x-frame-options"] == "DENY"
    # The dashboard shares one read a second between its pages (see the test below);
    # then it reads anew.
    time.sleep(STATE_EVERY)
    assert http.get("/ops/api/state", headers=BEARER).json()["at"] > first.json()["at"]
    body = first.json()
    assert set(body) >= {"queue", "running", "recent", "hour", "minutes", "biggest"}
    assert body["counting"] is True
    assert body["queue"]["worker_health"]  # the worker reports
    page = http.get("/ops/", headers=BEARER)
    assert page.status_code == 200
    assert 'id="running"' in page.text


def test_the_sign_in_form_sets_a_strict_httponly_session_cookie(
    http: httpx.Client, stack: DashboardStack
) -> None:
    wrong = http.post("/ops/login", data={"token": "nope"}, headers={"origin": stack.base_url})
    assert wrong.status_code == 401
    assert COOKIE not in wrong.cookies
    elsewhere = http.post(
        "/ops/login", data={"token": TOKEN}, headers={"origin": "https://evil.example"}
    )
    assert elsewhere.status_code == 403
    blind = http.post("/ops/login", data={"token": TOKEN})  # neither Origin nor Sec-Fetch-Site
    assert blind.status_code == 403
    response = http.post("/ops/login", data={"token": TOKEN}, headers={"origin": stack.base_url})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ops/" in cookie
    assert response.headers["cache-control"] == "no-store"
    state = http.get("/ops/api/state")  # the client keeps the cookie
    assert state.status_code == 200
    assert state.json()["queue"]["queued"] >= 0


def test_invalidation_needs_the_same_origin_and_the_csrf_token_and_a_confirmation(
    http: httpx.Client, stack: DashboardStack
) -> None:
    before = stack.stored()
    get_until_stored(http, "/sleep/gone?seconds=0", stack)
    get_until_stored(http, "/sleep/gone?seconds=0&v=2", stack)
    entries = stack.stored() - before
    assert len(entries) == 2
    csrf = sign_in(http, stack)
    here = {"origin": stack.base_url, "sec-fetch-site": "same-origin"}
    form = {"path": "/sleep/gone", "csrf": csrf, "confirm": "yes"}
    refusals = [
        ({**form, "csrf": ""}, here),
        ({**form, "csrf": "0" * 64}, here),
        (form, {"origin": "https://evil.example"}),
        (form, {"sec-fetch-site": "cross-site"}),
        (form, {"origin": stack.base_url, "sec-fetch-site": "same-site"}),
        (form, {}),
    ]
    for data, headers in refusals:
        refused = http.post("/ops/invalidate", data=data, headers=headers)
        assert refused.status_code == 403, (data, headers)
    assert http.get("/ops/invalidate").status_code == 405  # POST only
    assert stack.stored() >= entries
    confirm = http.post("/ops/invalidate", data={**form, "confirm": ""}, headers=here)
    assert confirm.status_code == 200
    assert 'id="confirm"' in confirm.text
    assert "/sleep/gone" in confirm.text
    assert stack.stored() >= entries  # asking is not doing
    done = http.post("/ops/invalidate", data=form, headers=here)
    assert done.status_code == 200, done.text
    assert "2 entries of /sleep/gone invalidated" in done.text
    assert not stack.stored() & entries
    assert http.get("/sleep/gone?seconds=0").status_code == 202


def test_running_jobs_show_their_progress(http: httpx.Client, stack: DashboardStack) -> None:
    assert http.get("/sleep/long?seconds=8").status_code == 202

    def running() -> dict[str, Any] | None:
        jobs = stack.state(http)["running"]
        return next((job for job in jobs if job["path"] == "/sleep/long"), None)

    job = wait_for("the job runs", running, stack)
    assert job["fraction"] is None  # nothing reported yet
    stack.report(job["job_id"], Progress(3, 10, "step 3 of 10"))
    job = wait_for("its progress shows", lambda: (j := running()) and j["fraction"] and j, stack)
    assert job["fraction"] == pytest.approx(0.3)
    assert job["message"] == "step 3 of 10"
    stack.report(job["job_id"], Progress(0.75))
    wait_for("it moves", lambda: (j := running()) and j["fraction"] == 0.75, stack)


def test_recent_jobs_and_the_hit_ratio_come_from_real_requests(
    http: httpx.Client, stack: DashboardStack
) -> None:
    hour = stack.state(http)["hour"]
    get_until_stored(http, "/sleep/counted?seconds=0.2", stack)
    for _ in range(5):
        assert http.get("/sleep/counted?seconds=0.2").status_code == 200

    def counted() -> dict[str, Any] | None:
        state = stack.state(http)
        ended = [job for job in state["recent"] if job["path"] == "/sleep/counted"]
        grown = (
            state["hour"]["hits"] >= hour["hits"] + 6 and state["hour"]["misses"] > hour["misses"]
        )
        return state if ended and grown else None

    state = wait_for("the counts are written", counted, stack)
    job = next(job for job in state["recent"] if job["path"] == "/sleep/counted")
    assert job["outcome"] == "stored"
    assert 0.2 <= job["seconds"] < 5
    assert 0 < state["hour"]["hit_ratio"] < 1
    assert state["hour"]["lookup_ms"] > 0
    assert state["minutes"][-1]["hits"] > 0
    # Counted again every few seconds (BIGGEST_EVERY), not at each read.
    biggest = {"path": "/sleep/counted", "entries": 1}
    wait_for("the biggest paths", lambda: biggest in stack.state(http)["biggest"], stack)


def test_the_cli_serves_it_apart_and_sees_what_the_processes_wrote(
    tmp_path: Path, stack: DashboardStack
) -> None:
    env = environment(stack.prefix)
    missing = {k: v for k, v in env.items() if k != "ASGI_WORKER_DASHBOARD_TOKEN"}
    refused = subprocess.run(
        asgi_worker_command("dashboard", APP), env=missing, capture_output=True, timeout=60
    )
    assert refused.returncode == 2
    assert b"ASGI_WORKER_DASHBOARD_TOKEN" in refused.stderr
    port = free_port()
    with processes(tmp_path, env) as group:
        group.start("dashboard", asgi_worker_command("dashboard", APP, "--port", str(port)))
        base = f"http://127.0.0.1:{port}"
        group.wait_for("dashboard", lambda: httpx.get(f"{base}/", timeout=1).status_code == 401)
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            get_until_stored(http, "/sleep/apart?seconds=0", stack)
        with httpx.Client(base_url=base, timeout=10, headers=BEARER) as dashboard:

            def seen() -> bool:
                state = dashboard.get("/api/state").json()
                return any(job["path"] == "/sleep/apart" for job in state["recent"])

            wait_for("the other processes' jobs", seen, stack)
            assert dashboard.get("/").headers["cache-control"] == "no-store"


# memory://: everything in this process.


async def test_memory_backend_in_process() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        if request.query_params.get("wait"):
            await report_progress(1, 4, "a quarter")
            await release.wait()
        return JSONResponse({"path": request.url.path})

    config = Config(redis_url="memory://", dashboard_counts=True, exclude=("/ops*",))
    app = Starlette(
        routes=[Route("/slow/{name}", slow), Mount("/ops", create_dashboard(config, token=TOKEN))]
    )
    app.add_middleware(WorkerMiddleware, config=config)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/ops/api/state")).status_code == 401
            assert (await http.get("/slow/held?wait=1")).status_code == 202
            for _ in range(200):  # the job's task starts on the loop's next turns
                state = (await http.get("/ops/api/state", headers=BEARER)).json()
                if state["running"]:
                    break
                await asyncio.sleep(0.01)
            [job] = state["running"]
            assert job["path"] == "/slow/held"
            middleware = find_middleware(app)
            assert middleware is not None
            assert isinstance(middleware.queue, InProcessQueue)
            for _ in range(200):  # the handler's first report is written on the loop's next turn
                state = (await http.get("/ops/api/state", headers=BEARER)).json()
                if state["running"][0]["fraction"] is not None:
                    break
                await asyncio.sleep(0.01)
            assert state["running"][0]["fraction"] == 0.25
            assert state["running"][0]["message"] == "a quarter"
            release.set()
            await middleware.drain()
            for _ in range(3):
                assert (await http.get("/slow/held?wait=1")).status_code == 200
            state = (await http.get("/ops/api/state", headers=BEARER)).json()
            assert state["running"] == []
            assert [job["path"] for job in state["recent"]] == ["/slow/held"]
            assert state["recent"][0]["outcome"] == "stored"
            assert state["hour"]["hits"] == 3
            assert state["hour"]["misses"] == 1
            assert state["biggest"] == [{"path": "/slow/held", "entries": 1}]
            done = await http.post(
                "/ops/invalidate", data={"path": "/slow/held", "confirm": "yes"}, headers=BEARER
            )
            assert "1 entry of /slow/held invalidated" in done.text
            assert (await http.get("/slow/held?wait=1")).status_code == 202
            release.set()
            await middleware.drain()


async def test_mounted_inside_the_cache_by_mistake_nothing_of_it_is_stored() -> None:
    """Without `exclude`: its answers are `no-store`, so the cache never keeps one."""
    config = Config(redis_url="memory://")
    app = Starlette(routes=[Mount("/ops", create_dashboard(config, token=TOKEN))])
    app.add_middleware(WorkerMiddleware, config=config)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            answers = []
            for _ in range(3):
                answers.append(await http.get("/ops/"))
                middleware = find_middleware(app)
                assert middleware is not None
                await middleware.drain()
            assert [a.status_code for a in answers] == [202, 401, 401]  # then hit-for-pass
            assert all("hit" not in a.headers.get("cache-status", "") for a in answers)
            state = await http.get("/ops/api/state", headers=BEARER)  # credentials: bypass
            assert state.status_code == 200
            # What is kept for its path is the hit-for-pass marker, never a page of it.
            assert state.json()["biggest"] == [{"path": "/ops/", "entries": 1}]


async def test_a_web_process_writes_its_counts_within_a_second_and_at_shutdown(
    config: Config, redis: Redis
) -> None:
    config = dataclasses.replace(config, dashboard_counts=True, exclude=("/ops*",))

    async def page(request: Request) -> Response:
        return JSONResponse({"path": request.url.path})

    app = Starlette(
        routes=[Route("/page", page), Mount("/ops", create_dashboard(config, token=TOKEN))]
    )
    app.add_middleware(WorkerMiddleware, config=config)
    minute = RedisKeys(config.prefix).minute_counts(int(time.time()) // 60)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.get("/page")).status_code == 202  # no worker: stays a miss
            assert not await redis.exists(minute)  # not on the request's path
            await asyncio.sleep(WRITE_AFTER + 0.5)
            state = (await http.get("/ops/api/state", headers=BEARER)).json()
            assert state["hour"]["misses"] == 1
            assert state["hour"]["lookups"] == 1
            assert (await http.get("/page")).status_code == 202
        middleware = find_middleware(app)
        assert middleware is not None
        observer = dashboard_observer(middleware.observer)
        assert observer is not None
    # Shut down within the second: the last count was written then, and the client closed.
    assert await redis.hget(minute, "misses") == b"2"
    assert observer._client is None


# The session's signing, by itself.


def test_sessions_are_signed_with_the_token_and_expire() -> None:
    now = [1_000_000.0]
    sessions = Sessions("s3cret", clock=lambda: now[0])
    cookie = sessions.new()
    session = sessions.session_of(cookie)
    assert session is not None
    assert Sessions("other", clock=lambda: now[0]).session_of(cookie) is None
    session_id, issued, mac = cookie.split(".")
    assert sessions.session_of(f"{session_id}.{int(issued) + 1}.{mac}") is None
    assert sessions.session_of(cookie + "x") is None
    assert sessions.csrf_matches(session, sessions.csrf(session))
    assert not sessions.csrf_matches(session, sessions.csrf(session + "x"))
    now[0] += SESSION_SECONDS + 1
    assert sessions.session_of(cookie) is None
    with pytest.raises(ValueError):
        Sessions("")


def test_same_origin_needs_a_browser_to_say_so() -> None:
    assert same_origin("same-origin", "http://h:1", "http", "h:1")
    assert same_origin("same-origin", None, "http", "h:1")
    assert same_origin(None, "http://h:1", "http", "h:1")
    assert not same_origin(None, None, "http", "h:1")
    assert not same_origin("cross-site", "http://h:1", "http", "h:1")
    assert not same_origin("same-site", None, "http", "h:1")
    assert not same_origin(None, "http://evil:1", "http", "h:1")
    assert not same_origin(None, "https://h:1", "http", "h:1")


# docs/dashboard.md's example, as written.


async def test_the_docs_example_mounts_it_outside_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASGI_WORKER_DASHBOARD_TOKEN", TOKEN)
    namespace: dict[str, Any] = {}
    exec(compile(docs_example("dashboard.md", "mount"), "docs/dashboard.md", "exec"), namespace)
    app, config = namespace["app"], namespace["config"]
    redis = Redis.from_url(config.redis_url)
    try:
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/ops/")).status_code == 401
                state = await http.get("/ops/api/state", headers=BEARER)
                assert state.status_code == 200
                assert "cache-status" not in state.headers
                assert state.json()["counting"] is True
                report = await http.get("/report")
                assert report.status_code == 202  # the rest of the app is cached
    finally:
        async for key in redis.scan_iter(match=f"{config.prefix}*"):
            await redis.delete(key)
        async for key in redis.scan_iter(match=f"arq:*{config.prefix}*"):
            await redis.delete(key)
        await redis.aclose()


# The counts' own bounds, and their round trip through Redis.


def test_minute_counts_keep_the_last_hour_only() -> None:
    now = [60.0 * 1_000_000]
    counts = MinuteCounts(clock=lambda: now[0])
    for _ in range(MINUTES_KEPT + 10):
        counts.bucket().hits += 1
        counts.bucket().lookup_seconds += 0.001
        now[0] += 60
    now[0] -= 60
    kept = counts.last_hour()
    assert len(kept) == MINUTES_KEPT
    assert [b.minute for b in kept] == list(range(kept[0].minute, kept[0].minute + MINUTES_KEPT))
    assert kept[-1].minute == int(now[0]) // 60
    assert len(counts.take()) <= MINUTES_KEPT + 1
    assert counts.take() == []


async def test_counts_and_recent_jobs_round_trip_through_redis(redis: Redis, prefix: str) -> None:
    keys = RedisKeys(prefix)
    minute = int(time.time()) // 60
    buckets = [Bucket(minute - 1, 3, 1, 4, 0.002), Bucket(minute, 5, 0, 5, 0.001)]
    jobs = [RecentJob(f"/p/{n}", 0.5, "stored", 1000.0 + n) for n in range(RECENT_KEPT + 10)]
    for _ in range(2):  # written twice: the counts add up, the list stays capped
        async with redis.pipeline(transaction=False) as pipeline:
            write_minutes(pipeline, keys, buckets)
            push_jobs(pipeline, keys, jobs)
            await pipeline.execute()
    await redis.lpush(keys.recent_jobs(), b"not a job")
    read = await read_minutes(redis, keys)
    assert [(b.minute, b.hits, b.misses, b.lookups) for b in read] == [
        (minute - 1, 6, 2, 8),
        (minute, 10, 0, 10),
    ]
    assert read[0].lookup_seconds == pytest.approx(0.004)
    assert 0 < await redis.ttl(keys.minute_counts(minute)) <= (MINUTES_KEPT + 2) * 60
    latest = await read_jobs(redis, keys, 5)
    assert [job.path for job in latest] == ["/p/209", "/p/208", "/p/207", "/p/206"]
    assert await redis.llen(keys.recent_jobs()) == RECENT_KEPT + 1


async def test_pages_polling_one_dashboard_share_one_redis_read_a_second(config: Config) -> None:
    reader = RedisReader(config)
    reads = 0
    read_now = reader._read_now

    async def counted() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return await read_now()

    reader._state = _Reused(counted, STATE_EVERY)
    try:
        states = await asyncio.gather(*(reader.read() for _ in range(10)))  # ten tabs at once
        again = await reader.read()
        assert reads == 1
        assert all(state is again for state in states)
        await asyncio.sleep(STATE_EVERY)
        assert (await reader.read())["at"] > again["at"]  # then it is read anew
        assert reads == 2
    finally:
        await reader.close()
