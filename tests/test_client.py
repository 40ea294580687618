"""`asgi_worker.client.fetch`: Retry-After parsing, the Prefer header, polling, timeouts.

The unit tests drive `fetch` through `httpx.ASGITransport` and small scripted ASGI apps
(no middleware, no worker). The end-to-end ones poll a real `asgi-worker demo` subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from asgi_worker.cli.demo import client_js
from asgi_worker.client import (
    DEFAULT_RETRY_AFTER,
    MIN_RETRY_AFTER,
    PendingTimeout,
    fetch,
    parse_retry_after,
    retry_delay,
)

from .processes import PROJECT, demo
from .test_docs import docs_example, docs_page

MISS = "asgi-worker; fwd=uri-miss"
HIT = "asgi-worker; hit"
NOW = datetime(1994, 11, 6, 8, 49, 30, tzinfo=UTC)


# --- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        ("0", 0.0),
        (" 2 ", 2.0),
        ("0.5", 0.5),
        ("120", 120.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 7.0),  # IMF-fixdate, 7 s after NOW
        ("Sunday, 06-Nov-94 08:49:37 GMT", 7.0),  # obsolete RFC 850 form
        ("Sun Nov  6 08:49:37 1994", 7.0),  # obsolete asctime form (GMT implied)
        ("Sun, 06 Nov 1994 08:50:30 GMT", 60.0),
        ("Sun, 06 Nov 1994 08:49:00 GMT", 0.0),  # in the past: now
    ],
)
def test_parse_retry_after_valid(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-1", "1e3", "+3", "inf", "nan", "3 s", "Sun, 99 Nov 1994 08:49:37 GMT"],
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_parse_retry_after_date_defaults_to_the_current_time() -> None:
    in_a_minute = datetime.fromtimestamp(time.time() + 60, UTC)
    value = in_a_minute.strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(value)
    assert seconds is not None
    assert 58.0 <= seconds <= 60.0


@pytest.mark.parametrize(
    ("value", "max_retry_after", "delay"),
    [
        ("3", 10.0, 3.0),
        ("100", 10.0, 10.0),  # clamped to max_retry_after
        ("0", 10.0, MIN_RETRY_AFTER),  # never a busy loop
        (None, 10.0, DEFAULT_RETRY_AFTER),  # missing
        ("soon", 10.0, DEFAULT_RETRY_AFTER),  # invalid
        ("soon", 0.25, 0.25),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 10.0, MIN_RETRY_AFTER),  # long past
    ],
)
def test_retry_delay(value: str | None, max_retry_after: float, delay: float) -> None:
    assert retry_delay(value, max_retry_after=max_retry_after) == delay


# --- fetch against scripted ASGI apps -------------------------------------------------------


class Scripted:
    """An ASGI app that answers from a list of (status, headers), the last one repeating.

    Records the headers of every request, and may hold each request for `hold` seconds.
    """

    def __init__(self, *answers: tuple[int, dict[str, str]], hold: float = 0.0) -> None:
        self.answers = answers
        self.hold = hold
        self.requests: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.requests.append({k.decode(): v.decode() for k, v in scope["headers"]})
        if self.hold:
            await asyncio.sleep(self.hold)
        status, headers = self.answers[min(len(self.requests), len(self.answers)) - 1]
        body = f"answer {len(self.requests)}".encode()
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def client_for(app: Scripted) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


PENDING = (202, {"retry-after": "0", "cache-status": MISS})
READY = (200, {"cache-status": HIT})


async def test_fetch_sends_prefer_wait_by_default() -> None:
    app = Scripted(READY)
    async with client_for(app) as client:
        response = await fetch("/report?year=2026", client=client)
    assert response.status_code == 200
    assert response.text == "answer 1"
    assert len(app.requests) == 1
    assert app.requests[0]["prefer"] == "wait=5"


@pytest.mark.parametrize(
    ("options", "prefer"),
    [
        ({"wait": None}, None),
        ({"wait": 0}, None),
        ({"wait": 0.9}, None),  # under a second: whole seconds only
        ({"wait": 2.7}, "wait=2"),
        ({"wait": 30.0}, "wait=29"),  # never beyond the time left (timeout 30)
        ({"wait": 5.0, "timeout": 3.0}, "wait=2"),
        ({"headers": {"Prefer": "respond-async"}}, "respond-async, wait=5"),
        ({"headers": {"Prefer": "respond-async"}, "wait": None}, "respond-async"),
    ],
)
async def test_fetch_prefer_header(options: dict[str, object], prefer: str | None) -> None:
    app = Scripted(READY)
    async with client_for(app) as client:
        await fetch("/x", client=client, **options)  # type: ignore[arg-type]
    assert app.requests[0].get("prefer") == prefer


async def test_fetch_sends_the_callers_headers() -> None:
    app = Scripted(READY)
    async with client_for(app) as client:
        await fetch("/x", client=client, headers={"Accept-Language": "de", "X-Trace": "t1"})
    assert app.requests[0]["accept-language"] == "de"
    assert app.requests[0]["x-trace"] == "t1"
    assert app.requests[0]["prefer"] == "wait=5"


async def test_fetch_polls_until_not_202() -> None:
    app = Scripted(PENDING, PENDING, READY)
    started = time.monotonic()
    async with client_for(app) as client:
        response = await fetch("/x", client=client)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.text == "answer 3"
    assert response.headers["cache-status"] == HIT
    assert len(app.requests) == 3
    assert all(request["prefer"] == "wait=5" for request in app.requests)
    assert 2 * MIN_RETRY_AFTER <= elapsed < 1.0  # "Retry-After: 0" still pauses, briefly


@pytest.mark.parametrize("status", [200, 404, 500, 503])
async def test_fetch_returns_any_other_status_at_once(status: int) -> None:
    app = Scripted((status, {"retry-after": "1"}))
    async with client_for(app) as client:
        response = await fetch("/x", client=client)
    assert response.status_code == status
    assert len(app.requests) == 1


async def test_fetch_clamps_retry_after_to_max() -> None:
    app = Scripted((202, {"retry-after": "3600"}), READY)
    started = time.monotonic()
    async with client_for(app) as client:
        response = await fetch("/x", client=client, max_retry_after=0.2)
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert len(app.requests) == 2
    assert 0.2 <= elapsed < 1.0


async def test_fetch_times_out_with_pending_timeout() -> None:
    app = Scripted((202, {"retry-after": "0.1", "cache-status": MISS}))
    started = time.monotonic()
    async with client_for(app) as client:
        with pytest.raises(PendingTimeout) as caught:
            await fetch("/never", client=client, timeout=0.45)
    elapsed = time.monotonic() - started
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert error.url == "/never"
    assert error.timeout == 0.45
    assert error.attempts == len(app.requests)
    assert 4 <= error.attempts <= 5  # at 0, 0.1, 0.2, 0.3, 0.4 s
    assert error.last_response is not None
    assert error.last_response.status_code == 202
    assert error.last_response.text == f"answer {error.attempts}"
    assert "/never still pending after" in str(error)
    assert 0.45 <= elapsed < 0.8  # the last pause is cut at the deadline


async def test_fetch_timeout_cancels_a_request_in_flight() -> None:
    app = Scripted(READY, hold=5.0)
    started = time.monotonic()
    async with client_for(app) as client:
        with pytest.raises(PendingTimeout) as caught:
            await fetch("/slow", client=client, timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert caught.value.attempts == 1
    assert caught.value.last_response is None
    assert "last status: none" in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("inf")},
        {"timeout": float("nan")},
        {"wait": -1},
        {"wait": float("inf")},
        {"max_retry_after": 0},
    ],
)
async def test_fetch_rejects_bad_arguments(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        await fetch("http://127.0.0.1:9/", **options)  # type: ignore[arg-type]


async def test_fetch_without_httpx_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` now fails
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'asgi-worker\[client\]'"):
        await fetch("http://127.0.0.1:9/")


def test_package_imports_without_httpx() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "import asgi_worker, asgi_worker.client, asgi_worker.cli.demo\n"
        "print(asgi_worker.client.PendingTimeout.__mro__[1].__name__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TimeoutError"


# --- fetch against the real demo (uvicorn, memory:// backend) --------------------------------


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`asgi-worker demo --seconds 1` as a subprocess (Retry-After: 1); its base URL."""
    with demo(tmp_path_factory.mktemp("demo"), seconds=1) as (base, _):
        yield base


class Recorder:
    """An httpx response hook: (seconds since creation, status) of every response."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seen: list[tuple[float, int]] = []

    async def __call__(self, response: httpx.Response) -> None:
        self.seen.append((time.monotonic() - self.started, response.status_code))

    @property
    def statuses(self) -> list[int]:
        return [status for _, status in self.seen]

    @property
    def gaps(self) -> list[float]:
        times = [at for at, _ in self.seen]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


@pytest.mark.e2e
async def test_fetch_polls_the_demo_until_the_result(demo_url: str) -> None:
    recorder = Recorder()
    async with httpx.AsyncClient(base_url=demo_url, event_hooks={"response": [recorder]}) as c:
        # wait=None: no Prefer, so the demo answers 202 at once and the client must poll.
        response = await fetch("/slow?n=2000", client=c, wait=None, timeout=10)
    assert response.status_code == 200
    assert response.headers["cache-status"] == HIT
    assert response.json()["n"] == 2000
    assert response.json()["primes"] == 303
    # The job takes 1 s and Retry-After is 1: ready on the 2nd request, or the 3rd if the
    # 2nd came a moment early. Never a busy loop.
    assert recorder.statuses in ([202, 200], [202, 202, 200]), recorder.seen
    assert all(gap >= 0.95 for gap in recorder.gaps), recorder.seen  # slept Retry-After


@pytest.mark.e2e
async def test_fetch_gives_up_on_the_demo_with_pending_timeout(demo_url: str) -> None:
    url = f"{demo_url}/slow?n=3000&seconds=5"
    started = time.monotonic()
    with pytest.raises(PendingTimeout) as caught:
        await fetch(url, wait=None, timeout=1.5)  # its own client: an absolute URL
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.url == url
    assert error.attempts == 2  # at 0 s and 1 s; the next would be at 2 s, past the deadline
    assert error.last_response is not None
    assert error.last_response.status_code == 202
    assert error.last_response.headers["retry-after"] == "1"
    assert error.last_response.headers["cache-status"] == MISS
    assert 1.5 <= elapsed < 2.2


@pytest.mark.e2e
async def test_fetch_with_prefer_wait_gets_the_demo_result(demo_url: str) -> None:
    # Whether or not the server holds the request (Prefer: wait=5), the result arrives.
    recorder = Recorder()
    async with httpx.AsyncClient(base_url=demo_url, event_hooks={"response": [recorder]}) as c:
        response = await fetch("/slow?n=4000", client=c, timeout=10)
    assert response.status_code == 200
    assert response.json()["primes"] == 550
    assert recorder.statuses[-1] == 200
    assert set(recorder.statuses[:-1]) <= {202}
    assert len(recorder.statuses) <= 3
    if "preference-applied" in response.headers:  # a server that honoured the wait
        assert response.headers["preference-applied"] == "wait=5"
        assert recorder.statuses == [200]


@pytest.mark.e2e
async def test_the_docs_client_example_counts_primes(demo_url: str) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(docs_example("clients.md", "client"), "docs/clients.md", "exec"), namespace)
    assert await namespace["primes_up_to"](6000, base_url=demo_url) == 783


async def test_the_docs_static_mount_serves_the_js_client() -> None:
    # docs/clients.md's recipe for serving client.js from the installed package.
    mount = 'Mount("/static/asgi-worker", StaticFiles(packages=[("asgi_worker", "static")]))'
    assert mount in docs_page("clients.md")
    app = Starlette(routes=[eval(mount, {"Mount": Mount, "StaticFiles": StaticFiles})])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/static/asgi-worker/client.js")
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }
    assert response.content == client_js()
    assert b"export async function fetchWhenReady(" in response.content


async def test_on_progress_asks_for_json_after_the_callers_accept() -> None:
    state = '{"status":"running","progress":0.5,"message":"half","position":null,"eta_seconds":2}'
    app = Scripted((202, {"retry-after": "0", "content-type": "application/json"}), READY)
    seen = []
    async with client_for(JsonScripted(app, state)) as client:
        response = await fetch(
            "/r", client=client, wait=None, headers={"Accept": "text/csv"}, on_progress=seen.append
        )
    assert response.status_code == 200
    assert app.requests[0]["accept"] == "text/csv, application/json;q=0.001"
    [progress] = seen
    assert (progress.status, progress.progress, progress.message) == ("running", 0.5, "half")
    assert (progress.position, progress.eta_seconds) == (None, 2.0)
    assert progress.response.status_code == 202


async def test_on_progress_skips_a_202_without_json_and_awaits_a_coroutine() -> None:
    app = Scripted(PENDING, PENDING, READY)
    called = []

    async def note(progress: object) -> None:
        called.append(progress)

    async with client_for(app) as client:
        response = await fetch("/r", client=client, wait=None, on_progress=note)
    assert response.status_code == 200
    assert called == []  # the scripted 202s are empty: nothing to pass on
    assert app.requests[0]["accept"] == "*/*, application/json;q=0.001"


class JsonScripted:
    """`Scripted`, whose 202s carry `state` as their body."""

    def __init__(self, app: Scripted, state: str) -> None:
        self.app = app
        self.state = state.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_state(message: Message) -> None:
            if message["type"] == "http.response.body" and self.status == 202:
                message = {**message, "body": self.state}
            elif message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)

        self.status = 0
        await self.app(scope, receive, with_state)
