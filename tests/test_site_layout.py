"""The documentation site reads well on a laptop (1280 px) and a phone (390 px), every page.

The site is built once (`mkdocs build --strict`, as tests/test_docs.py does), served from
a thread on a free loopback port, and each page is loaded in one headless Chromium (see
tests/test_browser.py) and measured at both widths:

- at 1280 x 800, no code block needs horizontal scrolling: the content column has room
  for the docs' 100-character lines (docs/stylesheets/extra.css widens it);
- at 390 x 844, the page itself does not overflow sideways: a wide table or code block
  scrolls inside its own box;
- in tables, no `code` is broken inside a word (`job_timeou` / `t`): a long name widens
  its column, and the table scrolls if it must.

No request leaves the loopback (the theme's web fonts fail to resolve: the fallback
fonts' metrics are within a few percent), and the search worker is not started (it
indexes the whole site on every page load): the test needs no network and takes seconds.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from .test_browser import CHROMIUM, CHROMIUM_ARGS, MISSING
from .test_docs import ROOT, build

pytestmark = pytest.mark.e2e

WIDE = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}

# One evaluation per page and width; each list names what is wrong, empty when all is well.
MEASURE = """() => {
    const content = document.querySelector(".md-content");
    const scrolling = [...content.querySelectorAll("pre > code")]
        .filter((code) => code.scrollWidth > code.clientWidth)
        .map((code) => {
            const lines = code.textContent.split("\\n");
            const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), "");
            return `${code.scrollWidth - code.clientWidth} px too wide: ${longest}`;
        });
    // A word is a run of identifier characters: a line may break at a space, a hyphen,
    // a slash or a dot, never inside `job_timeout`.
    const broken = [];
    for (const code of content.querySelectorAll("table code")) {
        const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
        for (let text = walker.nextNode(); text; text = walker.nextNode()) {
            for (const word of text.data.matchAll(/[A-Za-z0-9_]{2,}/g)) {
                const range = document.createRange();
                range.setStart(text, word.index);
                range.setEnd(text, word.index + word[0].length);
                const tops = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
                if (tops.size > 1) broken.push(`${word[0]} in ${code.textContent}`);
            }
        }
    }
    const page = document.documentElement;
    const overflow = Math.max(page.scrollWidth, document.body.scrollWidth) - page.clientWidth;
    return { scrolling, broken, overflow };
}"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", directory)
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


def site_pages(site: Path) -> list[str]:
    """The path of every page of the built site, `/` first."""
    pages = sorted(f"/{page.parent.relative_to(site)}/" for page in site.rglob("index.html"))
    return [page.replace("/./", "/") for page in pages]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def base_url(site: Path) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[Page]:
    if not CHROMIUM.is_file():
        pytest.fail(MISSING)
    with sync_playwright() as playwright:
        offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
        browser: Browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, offline]
        )
        page = browser.new_page(viewport=WIDE)
        page.set_default_timeout(10_000)
        page.route("**/assets/javascripts/workers/*", lambda route: route.abort())
        yield page
        browser.close()


def measure(page: Page) -> dict[str, Any]:
    found: dict[str, Any] = page.evaluate(MEASURE)
    return found


def test_every_page_reads_at_1280_and_at_390_px(site: Path, base_url: str, page: Page) -> None:
    pages = site_pages(site)
    assert {"/", "/failure-modes/", "/configuration/", "/repo/CHANGELOG/"} <= set(pages)
    problems: list[str] = []
    widths = [WIDE, NARROW]
    for path in pages:
        page.goto(base_url + path)  # at the width the previous page ended at
        for viewport in widths:
            page.set_viewport_size(viewport)
            found = measure(page)
            at = f"{path} at {viewport['width']} px"
            if viewport is WIDE:
                problems += [f"{at}, a code block scrolls: {s}" for s in found["scrolling"]]
            elif found["overflow"] > 0:
                problems.append(f"{at} overflows the screen by {found['overflow']} px")
            problems += [f"{at}, a word is broken: {b}" for b in found["broken"]]
        widths.reverse()  # the next page starts where this one ended: one layout less
    assert problems == [], "\n".join(problems)


def test_the_overflow_check_bites(base_url: str, page: Page) -> None:
    # A wide table that no longer scrolls in its own box widens the page: the check sees it.
    page.set_viewport_size(NARROW)
    page.goto(base_url + "/configuration/")
    assert measure(page)["overflow"] == 0
    page.add_style_tag(
        content=".md-typeset__scrollwrap, .md-typeset table:not([class]) { overflow: visible }"
        " .md-typeset table:not([class]) code { white-space: nowrap }"
    )
    assert measure(page)["overflow"] > 0
