"""`Prefer: wait` and `Prefer: respond-async` (RFC 7240), on every backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.testing import find_middleware
from asgi_worker.web.waiting import Preference, parse_prefer

from .conftest import WITH_CLUSTER, backend
from .helpers import backend_config, serve

# Every test here runs on the Cluster too.
kind = pytest.fixture(params=WITH_CLUSTER, name="kind")(backend)


@dataclass
class Slow:
    delay: float = 0.05
    runs: int = 0


def slow_app(config: Config, slow: Slow) -> Starlette:
    async def work(request: Request) -> Response:
        slow.runs += 1
        await asyncio.sleep(slow.delay)
        return PlainTextResponse(f"done {request.url.query}")

    app = Starlette(routes=[Route("/work", work)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@dataclass
class Site:
    app: Starlette
    http: httpx.AsyncClient
    slow: Slow
    config: Config


async def open_site(kind: str, config: Config, **changes: object) -> AsyncIterator[Site]:
    slow = Slow()
    site_config = backend_config(kind, config, **changes)
    app = slow_app(site_config, slow)
    async with serve(app, worker=site_config) as http:
        yield Site(app, http, slow, site_config)


@pytest.fixture
async def site(kind: str, config: Config) -> AsyncIterator[Site]:
    async for value in open_site(kind, config):
        yield value


WAIT = {"prefer": "wait=5"}


# Waiters must be woken by the commit, not find the response when their wait=5 runs
# out: the time bounds below are far under 5 s and far over what the jobs take.
WOKEN_WITHIN = 2.5


async def test_a_fast_job_is_served_in_the_same_request(site: Site) -> None:
    started = time.monotonic()
    response = await site.http.get("/work?a", headers=WAIT)
    assert time.monotonic() - started < WOKEN_WITHIN
    assert response.status_code == 200
    assert response.text == "done a"
    assert response.headers["preference-applied"] == "wait=5"
    assert response.headers["cache-status"] == "asgi-worker; hit"
    # Without the preference: the stored response, no Preference-Applied.
    again = await site.http.get("/work?a")
    assert again.text == "done a"
    assert "preference-applied" not in again.headers


async def test_many_waiters_are_woken_by_one_commit(site: Site) -> None:
    site.slow.delay = 0.3
    started = time.monotonic()
    responses = await asyncio.gather(*(site.http.get("/work?b", headers=WAIT) for _ in range(100)))
    assert time.monotonic() - started < WOKEN_WITHIN
    assert {(r.status_code, r.text) for r in responses} == {(200, "done b")}
    assert site.slow.runs == 1
    middleware = find_middleware(site.app)
    assert middleware is not None
    assert middleware.waiting == 0


async def test_a_slow_job_gets_202_after_max_wait(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, max_wait=0.3):
        site.slow.delay = 2.0
        started = time.monotonic()
        response = await site.http.get("/work?c", headers={"prefer": "wait=60"})
        elapsed = time.monotonic() - started
        assert response.status_code == 202
        assert "preference-applied" not in response.headers
        assert 0.3 <= elapsed < 1.5


async def test_respond_async_answers_at_once(site: Site) -> None:
    site.slow.delay = 2.0
    started = time.monotonic()
    response = await site.http.get("/work?d", headers={"prefer": "respond-async"})
    assert time.monotonic() - started < 1.0
    assert response.status_code == 202
    assert response.headers["preference-applied"] == "respond-async"


async def test_respond_async_with_wait_holds_then_answers_202(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, max_wait=0.3):
        site.slow.delay = 2.0
        started = time.monotonic()
        response = await site.http.get("/work?d2", headers={"prefer": "respond-async, wait=10"})
        assert 0.3 <= time.monotonic() - started < 1.5
        assert response.status_code == 202
        assert response.headers["preference-applied"] == "respond-async"
        site.slow.delay = 0.0
        fast = await site.http.get("/work?d3", headers={"prefer": "respond-async, wait=10"})
        assert fast.status_code == 200
        assert fast.headers["preference-applied"] == "wait=1"  # max_wait, in whole seconds


async def test_the_waiter_cap_holds(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, max_waiters=3):
        site.slow.delay = 0.5
        responses = await asyncio.gather(
            *(site.http.get("/work?e", headers=WAIT) for _ in range(10))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200] * 3 + [202] * 7


async def test_a_waiting_client_that_disconnects_is_cleaned_up(site: Site) -> None:
    site.slow.delay = 1.0
    middleware = find_middleware(site.app)
    if middleware is None:  # Starlette builds its stack on the first request
        await site.http.get("/work?warm-up")
        middleware = find_middleware(site.app)
    assert middleware is not None
    gone = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if not sent and not gone.is_set():
            gone.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.2)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "path": "/work",
        "raw_path": b"/work",
        "root_path": "",
        "query_string": b"f",
        "headers": [(b"host", b"testserver"), (b"prefer", b"wait=5")],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    started = time.monotonic()
    await middleware(scope, receive, send)
    assert time.monotonic() - started < 0.9  # returned when the client left, not at 5 s
    assert sent == []
    assert middleware.waiting == 0


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"wait=10"], Preference(wait=10)),
        ([b"respond-async, wait=5"], Preference(wait=5, respond_async=True)),
        ([b"handling=lenient", b'wait="7"'], Preference(wait=7)),
        ([b"WAIT=3"], Preference(wait=3)),
        ([b"wait=-1"], Preference()),
        ([b"wait=abc"], Preference()),
        ([b"wait=1.5"], Preference()),
        ([b"respond-async; foo=bar"], Preference(respond_async=True)),
        ([b"wait=3, wait=9"], Preference(wait=3)),
        ([b"\xff\xfe"], Preference()),
        ([b"wait=\xb2"], Preference()),  # a superscript two is a digit, but not ASCII
    ],
)
def test_parse_prefer(values: list[bytes], expected: Preference) -> None:
    assert parse_prefer(values) == expected


async def test_adaptive_retry_after_follows_the_paths_job_duration(
    kind: str, config: Config
) -> None:
    async for site in open_site(kind, config, adaptive_retry_after=True, max_retry_after=30):
        site.slow.delay = 1.2
        first = await site.http.get("/work?g1")
        assert first.headers["retry-after"] == "1"  # nothing known of /work yet
        await site.http.get("/work?g1", headers={"prefer": "wait=10"})  # job done
        second = await site.http.get("/work?g2")  # same path, another URL
        assert second.status_code == 202
        assert second.headers["retry-after"] == "2"  # ceil(1.2 s)
