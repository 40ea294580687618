"""What single pages promise: the home page's list, the failure tables, the commands.

The home page lists every page of mkdocs.yml's `nav`, in its order: a page added to the
nav and not to docs/index.md fails here, by name. The failure-modes page names real
status lines, and its two tables (the faults, and the tests that cause them) keep the
same rows. The README, docs/development.md and the noxfile run only tools that the
extras they install bring.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from http import HTTPStatus
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from mkdocs.config import load_config
from packaging.requirements import Requirement

from .test_faults import FAULTS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLISHED = "repo/"
"""Where the site publishes repository files that pages link to as `../<path>`
(mkdocs_hooks.py)."""


def nav_pages(items: list[Any], section: str = "") -> Iterator[tuple[str, str]]:
    """(title, path) of every page in a `nav` list, depth first: the order of the site."""
    for item in items:
        entries = item.items() if isinstance(item, dict) else [("", item)]
        for title, value in entries:
            where = f"{section} > {title}" if section else title
            if isinstance(value, list):
                yield from nav_pages(value, where)
            elif "://" not in value:
                yield where, value


def linked_pages(markdown: str) -> list[str]:
    """The docs paths a page links to, in order of first link; `../X` as the site's `repo/X`."""
    seen: dict[str, None] = {}
    for target in re.findall(r"\]\(([^)#\s]+)", markdown):
        if "://" not in target:
            seen[PUBLISHED + target[3:] if target.startswith("../") else target] = None
    return list(seen)


def test_the_home_page_lists_every_page_of_the_nav_in_its_order() -> None:
    # mkdocs's own loader: it reads the tags mkdocs.yml may hold (!ENV, !relative, ...).
    nav = dict(nav_pages(load_config(str(ROOT / "mkdocs.yml"))["nav"]))
    pages = {path: title for title, path in nav.items() if path != "index.md"}
    assert len(pages) >= 22
    listed = [path for path in linked_pages((DOCS / "index.md").read_text()) if path in pages]
    missing = [f"{pages[path]} ({path})" for path in pages if path not in listed]
    assert not missing, f"docs/index.md does not link to these pages of the nav: {missing}"
    assert listed == list(pages), "docs/index.md lists the nav's pages in another order"


def test_linked_pages_reads_links_as_the_site_publishes_them() -> None:
    markdown = "[a](a.md), [a again](a.md#x), [log](../CHANGELOG.md), [arq](https://x.org/)"
    assert linked_pages(markdown) == ["a.md", "repo/CHANGELOG.md"]
    nav = [{"Home": "index.md"}, {"Ops": [{"Metrics": "metrics.md"}, {"Out": "https://x"}]}]
    assert list(nav_pages(nav)) == [("Home", "index.md"), ("Ops > Metrics", "metrics.md")]


def failure_table(markdown: str, header: str) -> list[list[str]]:
    """The rows, as cells, of the table whose header row starts with `header`."""
    lines = markdown.splitlines()
    starts = [n for n, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"docs/failure-modes.md has {len(starts)} tables {header}...|"
    start = starts[0]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


FAILURE_MODES = (DOCS / "failure-modes.md").read_text()


def fault_rows() -> list[list[str]]:
    return failure_table(FAILURE_MODES, "| fault | what the client sees |")


def rows_of_tests() -> list[list[str]]:
    return failure_table(FAILURE_MODES, "| fault | tests |")


def test_each_status_line_on_the_failure_page_is_a_real_one() -> None:
    # `502 Response Too Large` is no status line: 502's is `502 Bad Gateway`.
    lines = re.findall(r"`(\d{3}) ([A-Z][A-Za-z -]*)`", FAILURE_MODES)
    assert len(lines) >= 8
    wrong = [f"{code} {text}" for code, text in lines if HTTPStatus(int(code)).phrase != text]
    assert not wrong, f"not status lines: {wrong}"


def test_the_job_failures_rows_say_what_test_faults_checks() -> None:
    # Each row whose test is test_failing_job_stores_short_lived_error[id] shows its
    # fault's status line and, where the body is not the reason phrase, the body.
    tests = {cells[0]: cells[1] for cells in rows_of_tests()}
    checked = 0
    for fault, client, *_ in fault_rows():
        for found in FAULTS:
            test = f"test_failing_job_stores_short_lived_error[{found.path[1:]}]"
            if test in tests.get(fault, ""):
                phrase = HTTPStatus(found.status).phrase
                assert f"`{found.status} {phrase}`" in client, (fault, client)
                if found.body.decode() != phrase:
                    assert f"body `{found.body.decode()}`" in client, (fault, client)
                checked += 1
    assert checked == len(FAULTS)


def test_the_tests_table_has_the_fault_tables_rows_in_its_order() -> None:
    # Add a fault to both tables: its row, then the tests that cause it.
    faults, tested = fault_rows(), rows_of_tests()
    assert all(len(cells) == 4 for cells in faults)
    assert all(len(cells) == 2 and "`test_" in cells[1] for cells in tested)
    faults, tested = [cells[0] for cells in faults], [cells[0] for cells in tested]
    assert len(faults) >= 30
    assert [f for f in faults if f not in tested] == [], "faults without a row of tests"
    assert [f for f in tested if f not in faults] == [], "tests of no fault"
    assert tested == faults, "the tests table lists the faults in another order"


@functools.cache
def commands_of(extra: str) -> frozenset[str]:
    """The commands `pip install -e '.[extra]'` puts in .venv/bin: the scripts of the
    distributions it installs, dependencies of dependencies too (read from what is
    installed here; a distribution that is not is taken to bring a command of its name)."""
    commands: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo = [("asgi-worker", extra)]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        try:
            found = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            # Not installed here (nox under the test extra): its command, by its name.
            commands.add(name)
            continue
        # Entry points, and scripts shipped as files (ruff's binary)
        commands |= {e.name for e in found.entry_points if e.group == "console_scripts"}
        commands |= {file.name for file in found.files or [] if file.parent.name == "bin"}
        for line in found.requires or []:
            required = Requirement(line)
            if required.marker is None or required.marker.evaluate({"extra": wanted}):
                todo += [(required.name, more) for more in {"", *required.extras}]
    return frozenset(commands)


def test_commands_of_follows_extras_and_dependencies() -> None:
    assert {"asgi-worker", "pytest", "mkdocs", "ruff"} <= commands_of("test")  # mkdocs: docs
    assert "nox" not in commands_of("test")
    assert "nox" in commands_of("dev")
    assert "pytest" not in commands_of("demo")


NOXFILE = ast.get_docstring(ast.parse((ROOT / "noxfile.py").read_text())) or ""


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("README.md", (ROOT / "README.md").read_text()),
        ("docs/development.md", (DOCS / "development.md").read_text()),
        ("noxfile.py", NOXFILE),
    ],
)
def test_each_command_a_page_names_comes_with_an_extra_it_installs(name: str, text: str) -> None:
    extras = set(re.findall(r"pip install -e '\.\[(\w+)\]'", text))
    assert extras, f"{name} installs nothing"
    tools = set(re.findall(r"\.venv/bin/([\w-]+)", text)) - {"pip", "python", "python3"}
    if re.search(r"(?<![\w/])nox -s", text):
        tools.add("nox")  # `nox -s docs` as such
    brought = set().union(*(commands_of(extra) for extra in extras))
    assert tools - brought == set(), f"{name} runs these, but installs only {sorted(extras)}"
