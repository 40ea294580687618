"""The demo page and `client.js` in a real headless Chromium (Debian's, driven by Playwright).

Needs `/usr/bin/chromium` (`apt-get install -y chromium`; `.ci/run` installs it) or the
path in `$CHROMIUM`. A missing browser is a failure, never a skip. Playwright's own browser
download (`playwright install`) is not used.

The demo runs as a real `asgi-worker demo` subprocess (memory:// backend). Tests of
`fetchWhenReady` run inside the demo's origin: against the demo's `/slow`, or against
`/mock/...` URLs answered by Playwright (`page.route`) for exact, server-independent cases.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Playwright,
    Request,
    Route,
    sync_playwright,
)

from asgi_worker.cli.demo import client_js

from .processes import PROJECT, demo

pytestmark = pytest.mark.e2e

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = f"{CHROMIUM} not found: apt-get install -y chromium (or set $CHROMIUM)"
HIT = "asgi-worker; hit"


def test_chromium_is_installed() -> None:
    assert CHROMIUM.is_file(), MISSING
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is not executable"


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`asgi-worker demo --seconds 1.5` as a subprocess; its base URL."""
    with demo(tmp_path_factory.mktemp("demo"), seconds=1.5) as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(MISSING)
    playwright: Playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


class Watched:
    """A page on the demo, with its script errors and requests recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[Request] = []
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", self._console)
        page.on("request", lambda request: self.requests.append(request))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def requests_to(self, path: str) -> list[Request]:
        return [request for request in self.requests if path in request.url]

    def run(self, script: str, argument: Any = None) -> Any:
        """Evaluate `script` (an async function of `argument`) with the client imported.

        The function sees the module's exports as `client`.
        """
        wrapped = f"""async (argument) => {{
            const client = await import("/client.js");
            return await ({script})(argument);
        }}"""
        return self.page.evaluate(wrapped, argument)


@pytest.fixture
def watched(browser: Browser, demo_url: str) -> Iterator[Watched]:
    context = browser.new_context(base_url=demo_url)
    page = context.new_page()
    page.set_default_timeout(10_000)
    watched = Watched(page)
    page.goto("/")
    yield watched
    context.close()
    assert watched.errors == []


def test_client_js_is_served_from_the_package(demo_url: str) -> None:
    response = httpx.get(f"{demo_url}/client.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.content == (PROJECT / "asgi_worker" / "static" / "client.js").read_bytes()
    assert response.content == client_js()
    assert b"export async function fetchWhenReady" in response.content
    assert "cache-status" not in response.headers  # not behind the worker


def test_demo_page_shows_processing_then_the_result(
    watched: Watched, demo_url: str, tmp_path: Path
) -> None:
    page = watched.page
    assert page.inner_text("#status") == "idle"
    # Record every text the status line shows, from the submit on.
    page.evaluate(
        """() => {
            window.statuses = [];
            const status = document.getElementById("status");
            new MutationObserver(() => window.statuses.push(status.textContent))
                .observe(status, { childList: true, characterData: true, subtree: true });
        }"""
    )
    page.fill("#n", "10000")
    started = time.monotonic()
    page.click("button")
    page.wait_for_function("document.getElementById('status').textContent !== 'idle'")
    processing = tmp_path / "demo-processing.png"
    page.screenshot(path=str(processing), full_page=True)
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('done')", timeout=10_000
    )
    elapsed = time.monotonic() - started

    statuses: list[str] = page.evaluate("window.statuses")
    assert statuses[0].startswith("processing"), statuses
    assert statuses[-1] == f"done (200, {HIT})", statuses
    assert all(text.startswith("processing") for text in statuses[:-1]), statuses
    result = json.loads(page.inner_text("#result"))
    assert result["n"] == 10000
    assert result["primes"] == 1229  # primes up to 10 000
    assert 1.5 <= result["took_seconds"] < 3.0
    assert 1.4 <= elapsed < 8.0

    slow = watched.requests_to("/slow?n=10000")
    # No Prefer: wait (the page wants a 202, and the job's state, every Retry-After).
    assert 2 <= len(slow) <= 5, [request.url for request in slow]
    assert all("prefer" not in request.all_headers() for request in slow)
    assert all(
        request.all_headers()["accept"] == "*/*, application/json;q=0.001" for request in slow
    )

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshots: {processing} (processing), {screenshot} (done)")
    for path in (processing, screenshot):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_page_fills_a_progress_bar_while_the_job_runs(watched: Watched) -> None:
    page = watched.page
    # Record every value the bar takes and every message shown, from the submit on.
    page.evaluate(
        """() => {
            window.bar = [];
            window.messages = [];
            const bar = document.getElementById("bar");
            const message = document.getElementById("message");
            new MutationObserver(() => window.bar.push(bar.value))
                .observe(bar, { attributes: true });
            new MutationObserver(() => window.messages.push(message.textContent))
                .observe(message, { childList: true, characterData: true, subtree: true });
        }"""
    )
    page.fill("#n", "777")
    # Five seconds of the demo's slow part (the form asks for the default two): a 202
    # every second, each a few steps further.
    page.route("**/slow?n=777", lambda route: route.continue_(url=route.request.url + "&seconds=5"))
    page.click("button")
    page.wait_for_function(
        "document.getElementById('status').textContent.startsWith('done')", timeout=15_000
    )
    values: list[float] = page.evaluate("window.bar")
    messages: list[str] = page.evaluate("window.messages")
    moving = [value for value in values if 0 < value < 1]
    assert len(set(moving)) >= 3, values  # the bar moved while the job ran
    assert moving == sorted(moving), values  # and only forward
    assert values[-1] == 1, values
    assert any(
        text.startswith("running") and "waiting on the slow part" in text for text in messages
    ), messages


def test_fetch_when_ready_calls_on_pending_against_the_demo(watched: Watched) -> None:
    outcome = watched.run(
        """async (url) => {
            const calls = [];
            const started = performance.now();
            const response = await client.fetchWhenReady(url, {
                wait: null,  // no Prefer: the demo answers 202 at once
                onPending: (attempt, pending) => {
                    calls.push([attempt, pending.status, pending.headers.get("retry-after")]);
                },
            });
            return {
                status: response.status,
                cacheStatus: response.headers.get("cache-status"),
                body: await response.json(),
                calls,
                seconds: (performance.now() - started) / 1000,
            };
        }""",
        "/slow?n=4000&seconds=1",
    )
    assert outcome["status"] == 200
    assert outcome["cacheStatus"] == HIT
    assert outcome["body"]["n"] == 4000
    assert outcome["body"]["primes"] == 550
    calls = outcome["calls"]
    assert calls in ([[1, 202, "1"]], [[1, 202, "1"], [2, 202, "1"]]), calls
    assert outcome["seconds"] >= 0.95 * len(calls)  # slept Retry-After after every 202
    slow = watched.requests_to("/slow?n=4000")
    assert len(slow) == len(calls) + 1
    assert all("prefer" not in request.all_headers() for request in slow)


def test_fetch_when_ready_times_out_against_the_demo(watched: Watched) -> None:
    outcome = watched.run(
        """async (url) => {
            const started = performance.now();
            try {
                await client.fetchWhenReady(url, { timeout: 0.3, wait: null });
                return { resolved: true };
            } catch (error) {
                return {
                    isError: error instanceof Error,
                    isPendingTimeout: error instanceof client.PendingTimeoutError,
                    name: error.name,
                    message: error.message,
                    url: error.url,
                    attempts: error.attempts,
                    status: error.response && error.response.status,
                    seconds: (performance.now() - started) / 1000,
                };
            }
        }""",
        "/slow?n=5000&seconds=5",
    )
    assert outcome.get("resolved") is None, outcome
    assert outcome["isError"] is True
    assert outcome["isPendingTimeout"] is True
    assert outcome["name"] == "PendingTimeoutError"
    assert outcome["url"] == "/slow?n=5000&seconds=5"
    assert outcome["attempts"] == 1  # Retry-After is 1 s; the timeout came first
    assert outcome["status"] == 202
    assert outcome["message"].startswith("/slow?n=5000&seconds=5 still pending after 1 ")
    assert 0.29 <= outcome["seconds"] < 1.0


# --- exact cases against responses made up by Playwright -------------------------------------


class Mock:
    """Answers `/mock/...` in the page: the given (status, headers) in turn, the last repeating.

    Records the request headers; `hang=True` never answers.
    """

    def __init__(self, *answers: tuple[int, dict[str, str]], hang: bool = False) -> None:
        self.answers = answers
        self.hang = hang
        self.headers: list[dict[str, str]] = []

    def __call__(self, route: Route) -> None:
        self.headers.append(route.request.headers)
        if self.hang:
            return
        status, headers = self.answers[min(len(self.headers), len(self.answers)) - 1]
        route.fulfill(status=status, headers=headers, body=f"answer {len(self.headers)}")


def test_fetch_when_ready_polls_with_prefer_header(watched: Watched) -> None:
    mock = Mock((202, {"retry-after": "0"}), (202, {"retry-after": "0"}), (200, {}))
    watched.page.route("**/mock/**", mock)
    outcome = watched.run(
        """async () => {
            const calls = [];
            const response = await client.fetchWhenReady("/mock/a", {
                headers: { "X-Trace": "t1" },
                onPending: (attempt, pending) => calls.push([attempt, pending.status]),
            });
            return { status: response.status, text: await response.text(), calls };
        }"""
    )
    assert outcome == {"status": 200, "text": "answer 3", "calls": [[1, 202], [2, 202]]}
    assert [headers.get("prefer") for headers in mock.headers] == ["wait=5"] * 3
    assert [headers.get("x-trace") for headers in mock.headers] == ["t1"] * 3


@pytest.mark.parametrize(
    ("options", "prefer"),
    [
        ("{ wait: null }", None),
        ("{ wait: 0.5 }", None),
        ("{ wait: 2.9 }", "wait=2"),
        ("{ wait: 5, timeout: 3 }", "wait=2"),  # never beyond the time left
        ("{ headers: { Prefer: 'respond-async' } }", "respond-async, wait=5"),
    ],
)
def test_fetch_when_ready_prefer_header(watched: Watched, options: str, prefer: str | None) -> None:
    mock = Mock((200, {}))
    watched.page.route("**/mock/**", mock)
    status = watched.run(f"async () => (await client.fetchWhenReady('/mock/p', {options})).status")
    assert status == 200
    assert len(mock.headers) == 1
    assert mock.headers[0].get("prefer") == prefer


def test_fetch_when_ready_clamps_retry_after(watched: Watched) -> None:
    watched.page.route("**/mock/**", Mock((202, {"retry-after": "3600"}), (200, {})))
    outcome = watched.run(
        """async () => {
            const started = performance.now();
            const response = await client.fetchWhenReady("/mock/c", { retryAfterMax: 0.2 });
            return { status: response.status, seconds: (performance.now() - started) / 1000 };
        }"""
    )
    assert outcome["status"] == 200
    assert 0.19 <= outcome["seconds"] < 1.0


def test_fetch_when_ready_times_out_during_a_request(watched: Watched) -> None:
    mock = Mock(hang=True)
    watched.page.route("**/mock/**", mock)
    outcome = watched.run(
        """async () => {
            const started = performance.now();
            try {
                await client.fetchWhenReady("/mock/h", { timeout: 0.3 });
                return { resolved: true };
            } catch (error) {
                return {
                    name: error.name,
                    attempts: error.attempts,
                    response: error.response,
                    seconds: (performance.now() - started) / 1000,
                };
            }
        }"""
    )
    assert outcome["name"] == "PendingTimeoutError"
    assert outcome["attempts"] == 1
    assert outcome["response"] is None
    assert 0.29 <= outcome["seconds"] < 1.0
    assert len(mock.headers) == 1


def test_fetch_when_ready_abort_signal_is_not_a_timeout(watched: Watched) -> None:
    watched.page.route("**/mock/**", Mock((202, {"retry-after": "0.1"})))
    outcome = watched.run(
        """async () => {
            const controller = new AbortController();
            setTimeout(() => controller.abort(), 250);
            let pending = 0;
            try {
                await client.fetchWhenReady("/mock/s", {
                    signal: controller.signal,
                    onPending: () => { pending += 1; },
                });
                return { resolved: true };
            } catch (error) {
                return { name: error.name, pending };
            }
        }"""
    )
    assert outcome["name"] == "AbortError"
    assert 2 <= outcome["pending"] <= 3  # at 0, 0.1, 0.2 s


def test_parse_retry_after_in_the_browser(watched: Watched) -> None:
    values = [
        "3",
        " 2 ",
        "0.5",
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "Sun, 06 Nov 1994 08:49:00 GMT",
        None,
        "",
        "soon",
        "-1",
        "1e3",
        "Infinity",
        "2026-01-01",
        "Sun, 99 Nov 1994 08:49:37 GMT",
    ]
    parsed = watched.run(
        """async (values) => values.map(
            (value) => client.parseRetryAfter(value, Date.UTC(1994, 10, 6, 8, 49, 30))
        )""",
        values,
    )
    expected = [3, 2, 0.5, 7, 7, 7, 0] + [None] * 8
    assert list(zip(values, parsed, strict=True)) == list(zip(values, expected, strict=True))

    delays = watched.run(
        """async () => [
            client.retryDelay(null, 10),
            client.retryDelay("soon", 10),
            client.retryDelay("0", 10),
            client.retryDelay("100", 10),
            client.retryDelay("3", 10),
        ]"""
    )
    assert delays == [1, 1, 0.05, 10, 3]
