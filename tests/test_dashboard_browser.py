"""The ops dashboard in a real headless Chromium (Debian's, driven by Playwright).

Signs in through the form, watches a running job's progress move as the test writes its
progress hash (as a worker reports it), and invalidates a path through the confirmation
page; the entry is then gone from Redis. A missing browser is a failure, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from asgi_worker.core.progress import Progress

from .dashboard_stack import TOKEN, DashboardStack, dashboard_stack, get_until_stored, wait_for
from .test_browser import CHROMIUM, CHROMIUM_ARGS, MISSING

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(MISSING)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DashboardStack]:
    with dashboard_stack(f"awtest-dashb-{tmp_path.name[-8:]}", tmp_path) as started:
        yield started


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


def sign_in(page: Page, stack: DashboardStack) -> None:
    answer = page.goto(f"{stack.base_url}/ops/")
    assert answer is not None
    assert answer.status == 401
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    expect(page.locator("#updated")).to_contain_text("updated", timeout=10_000)
    cookie = next(c for c in page.context.cookies() if c["name"] == "asgi_worker_dashboard")
    assert cookie["httpOnly"]
    assert cookie["sameSite"] == "Strict"


def test_a_running_jobs_progress_moves_on_the_page(page: Page, stack: DashboardStack) -> None:
    sign_in(page, stack)
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        assert http.get("/sleep/watched?seconds=12").status_code == 202
        row = page.locator("#running tr", has_text="/sleep/watched")
        expect(row).to_be_visible(timeout=10_000)
        expect(row.locator(".fraction")).to_have_text(" \N{EN DASH}")  # nothing reported

        def job_id() -> str | None:
            jobs = stack.state(http)["running"]
            return next((j["job_id"] for j in jobs if j["path"] == "/sleep/watched"), None)

        watched = wait_for("the job listed", job_id, stack)
    stack.report(watched, Progress(2, 10, "two of ten"))
    expect(row.locator(".fraction")).to_have_text(" 20%", timeout=5_000)
    expect(row).to_contain_text("two of ten")
    stack.report(watched, Progress(7, 10, "seven of ten"))
    expect(row.locator(".fraction")).to_have_text(" 70%", timeout=5_000)
    expect(row).to_contain_text("seven of ten")


def test_a_path_is_invalidated_through_the_confirmation(page: Page, stack: DashboardStack) -> None:
    before = stack.stored()
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        get_until_stored(http, "/sleep/old?seconds=0", stack)
    [entry] = stack.stored() - before
    sign_in(page, stack)
    expect(page.locator("#biggest")).to_contain_text("/sleep/old", timeout=10_000)
    page.fill("#path", "/sleep/old")
    page.click("#invalidate button[type=submit]")
    expect(page.locator("#confirm")).to_be_visible()
    assert stack.redis.exists(entry)  # asking is not doing
    page.click("#confirm")
    expect(page.locator("#message")).to_have_text("1 entry of /sleep/old invalidated.")
    assert not stack.redis.exists(entry)
    page.click("text=Back to the dashboard")
    expect(page.locator("#updated")).to_contain_text("updated", timeout=10_000)
