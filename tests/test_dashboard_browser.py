"""The ops dashboard in a real headless Chromium (Debian's, driven by Playwright).

Signs in through the form, watches a running job's progress move as its handler reports
it (`report_progress`, in a real worker), and invalidates a path through the confirmation
page; the entry is then gone from Redis. A missing browser is a failure, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

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
    """The handler reports (`report_progress`) in the worker, and the page shows it move.

    The same job's JSON 202 says the same: the client and the operator watch one job.
    """
    sign_in(page, stack)
    # Record every percentage the job's row shows.
    page.evaluate(
        """() => {
            window.fractions = [];
            new MutationObserver(() => {
                for (const row of document.querySelectorAll("#running tr")) {
                    if (row.textContent.includes("/steps/watched")) {
                        window.fractions.push(row.querySelector(".fraction").textContent.trim());
                    }
                }
            }).observe(document.getElementById("running"),
                       { childList: true, characterData: true, subtree: true });
        }"""
    )
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        url = "/steps/watched?steps=10&every=0.6"
        assert http.get(url).status_code == 202
        row = page.locator("#running tr", has_text="/steps/watched")
        expect(row).to_be_visible(timeout=10_000)
        expect(row).to_contain_text("of 10", timeout=5_000)
        client_saw = wait_for(
            "the JSON 202's progress",
            lambda: (
                (state := http.get(url, headers={"accept": "application/json"}).json())["progress"]
                and state
            ),
            stack,
        )
        assert client_saw["status"] == "running"
        assert client_saw["message"].startswith("step ")
        wait_for("the job's answer", lambda: http.get(url).status_code == 200, stack)
    shown = [text for text in page.evaluate("window.fractions") if text.endswith("%")]
    percentages = [int(text.rstrip("%")) for text in shown]
    assert len(set(percentages)) >= 3, shown  # it moved while the job ran
    assert percentages == sorted(percentages), shown  # and only forward


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
