"""Live streams reach their clients from the app, and the replay carries the client's address.

In process, on every backend (`kind`): a request that asks for an event stream never
waits on a 202, an event-stream answer makes its key hit-for-pass, and the replay sees the
address of the client whose request enqueued it (`request.client`), unless
`Config.replay_client` is off.

End to end, on Redis with a real `asgi-worker worker` and on memory:// (jobs in the web
process): uvicorn serves tests/e2e_app.py, whose `/events` (server-sent events) and
`/feed` (newline-delimited JSON) never end. Both must stream to their clients as if the
middleware were not there, `EventSource` in Chromium included, and neither may ever turn
into a stored 5xx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.testing import run_pending

from .conftest import REDIS_URL
from .helpers import backend_config, serve
from .stack import HIT, MISS, Stack, running_stack, wait_until

EVENTS = [b"data: one\n\n", b"data: two\n\n", b"data: three\n\n"]


def live_app(config: Config) -> Starlette:
    async def events(request: Request) -> Response:
        async def send_events() -> AsyncIterator[bytes]:
            for event in EVENTS:  # short, so httpx's in-process transport can read it whole
                yield event
                await asyncio.sleep(0)

        return StreamingResponse(send_events(), media_type="text/event-stream")

    async def client(request: Request) -> Response:
        address = request.client
        return JSONResponse(None if address is None else [address.host, address.port])

    app = Starlette(routes=[Route("/events", events), Route("/client", client)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@pytest.fixture
async def http(kind: str, config: Config, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    changes = getattr(request, "param", {})
    app = live_app(backend_config(kind, config, **changes))
    async with serve(app) as client:
        yield app, client


async def test_a_request_for_an_event_stream_goes_straight_to_the_app(http: Any) -> None:
    app, client = http
    for accept in ("text/event-stream", "text/html, TEXT/EVENT-STREAM;q=0.9"):
        answer = await client.get("/events", headers={"accept": accept})
        assert answer.status_code == 200, accept
        assert "cache-status" not in answer.headers
        assert answer.content == b"".join(EVENTS)
    assert await run_pending(app) == 0  # no job was queued for it


async def test_an_accept_that_refuses_event_streams_is_served_from_the_cache(http: Any) -> None:
    _, client = http
    answer = await client.get("/events", headers={"accept": "text/event-stream;q=0, */*"})
    assert answer.status_code == 202


async def test_an_event_stream_answer_is_never_stored_and_its_key_passes(http: Any) -> None:
    app, client = http
    first = await client.get("/events")
    assert (first.status_code, first.headers["cache-status"]) == (202, MISS)
    assert await run_pending(app) == 1
    later = await client.get("/events")
    assert later.status_code == 200
    assert "cache-status" not in later.headers  # the app's own stream, not a stored copy
    assert later.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in later.headers
    assert later.content == b"".join(EVENTS)


async def test_the_replay_sees_the_address_of_the_client_that_enqueued_it(http: Any) -> None:
    app, client = http
    assert (await client.get("/client")).status_code == 202
    assert await run_pending(app) == 1
    hit = await client.get("/client")
    assert hit.headers["cache-status"] == HIT
    assert hit.json() == ["127.0.0.1", 123]  # httpx.ASGITransport's client


@pytest.mark.parametrize("http", [{"replay_client": False}], indirect=True)
async def test_with_replay_client_off_the_replay_has_no_client(http: Any) -> None:
    app, client = http
    assert (await client.get("/client")).status_code == 202
    assert await run_pending(app) == 1
    hit = await client.get("/client")
    assert hit.headers["cache-status"] == HIT
    assert hit.json() is None


# --- end to end: uvicorn, a real worker, endless streams --------------------------------------

JOB_TIMEOUT = 2.0


@pytest.fixture(scope="module", params=["redis", "memory"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    backend = request.param
    prefix = f"awtest-live-{time.monotonic_ns():x}"
    redis_url = REDIS_URL if backend == "redis" else "memory://"
    with running_stack(
        prefix,
        tmp_path_factory.mktemp(f"live-{backend}"),
        worker=backend == "redis",
        redis_url=REDIS_URL,
        REDIS_URL=redis_url,
        JOB_TIMEOUT=str(JOB_TIMEOUT),
        EXCLUDE="/health,/live.html",
    ) as started:
        yield started


async def read_lines(response: httpx.Response, count: int) -> list[tuple[float, str]]:
    """The first `count` non-empty lines of a streamed body, each with when it came."""
    lines: list[tuple[float, str]] = []
    async for line in response.aiter_lines():
        if line.strip():
            lines.append((time.monotonic(), line))
            if len(lines) == count:
                break
    return lines


def assert_live(lines: list[tuple[float, str]]) -> None:
    """The lines came one by one as the app sent them (every 50 ms), not all at once."""
    spread = lines[-1][0] - lines[0][0]
    assert spread >= 0.05 * (len(lines) - 1) * 0.8, f"came within {spread:.3f} s: not live"


@pytest.mark.e2e
async def test_an_event_source_streams_live_as_if_the_middleware_were_not_there(
    stack: Stack,
) -> None:
    async with (
        stack.client() as http,
        http.stream("GET", "/events", headers={"accept": "text/event-stream"}) as response,
    ):
        assert response.status_code == 200
        assert "cache-status" not in response.headers
        lines = await asyncio.wait_for(read_lines(response, 4), 5)
    assert [line for _, line in lines] == [f"data: tick {n}" for n in range(4)]
    assert_live(lines)


async def stream_after_202(stack: Stack, path: str, *, within: float) -> list[tuple[float, str]]:
    """GET `path` (202, a job runs), until the app's own live stream answers."""
    async with stack.client() as http:
        first = await http.get(path)
        assert (first.status_code, first.headers["cache-status"]) == (202, MISS)
        deadline = time.monotonic() + within
        while True:
            async with http.stream("GET", path) as response:
                if response.status_code != 202:
                    assert response.status_code == 200, f"{path}: {response.status_code}"
                    assert "cache-status" not in response.headers  # the app's, not stored
                    return await asyncio.wait_for(read_lines(response, 3), 5)
            assert time.monotonic() < deadline, f"{path} still 202 after {within} s"
            await asyncio.sleep(0.05)


@pytest.mark.e2e
async def test_an_event_stream_replay_stops_at_once_and_its_key_passes(stack: Stack) -> None:
    began = time.monotonic()
    lines = await stream_after_202(stack, "/events?plain", within=JOB_TIMEOUT)
    # The job did not read the endless stream until job_timeout.
    assert time.monotonic() - began < JOB_TIMEOUT
    assert [line for _, line in lines] == [f"data: tick {n}" for n in range(3)]
    assert_live(lines)


@pytest.mark.e2e
async def test_a_feed_still_streaming_at_job_timeout_is_the_apps_never_a_stored_504(
    stack: Stack,
) -> None:
    began = time.monotonic()
    lines = await stream_after_202(stack, "/feed", within=JOB_TIMEOUT + 5)
    assert time.monotonic() - began >= JOB_TIMEOUT * 0.9  # it took the job's whole time
    assert [json.loads(line) for _, line in lines] == [{"n": n} for n in range(3)]
    assert_live(lines)
    if not stack.workers:
        return  # in-process jobs log through the web process, which shows no INFO lines
    wait_until(
        "the job's log line",
        lambda: "is a live stream (still streaming when the time limit ran out)" in stack.logs(),
        within=5,
        stack=stack,
    )


@pytest.mark.e2e
async def test_the_replay_sees_the_real_clients_address(stack: Stack) -> None:
    async with stack.client() as http:
        first = await http.get("/client")
        assert first.status_code == 202
        deadline = time.monotonic() + 10
        while (hit := await http.get("/client")).status_code == 202:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert hit.headers["cache-status"] == HIT
    seen = hit.json()
    assert seen["host"] == "127.0.0.1"
    assert seen["port"] > 0


@pytest.mark.e2e
def test_an_event_source_in_chromium_gets_every_event(stack: Stack) -> None:
    from playwright.sync_api import sync_playwright

    from .test_browser import CHROMIUM, CHROMIUM_ARGS, MISSING

    assert CHROMIUM.is_file(), MISSING
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{stack.base_url}/live.html")
            page.wait_for_function("document.querySelectorAll('#events li').length >= 5")
            items = page.eval_on_selector_all(
                "#events li", "items => items.map(i => i.textContent)"
            )
        finally:
            browser.close()
    assert items[:5] == [f"tick {n}" for n in range(5)]
