"""The README, the front door: its two commands work, and its links lead somewhere.

What the README used to hold is under docs/ now, and checked there (tests/test_docs.py).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

DEMO_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/asgi-worker demo"
)
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"


def shell_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_the_two_commands_are_in_the_readme_each_a_block_of_its_own() -> None:
    blocks = shell_blocks(README)
    assert DEMO_COMMAND in blocks
    assert TEST_COMMAND in blocks


def test_ci_runs_the_readmes_test_command_verbatim() -> None:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert lines[-1] == TEST_COMMAND


def test_the_extras_and_the_script_the_commands_name_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for command in (DEMO_COMMAND, TEST_COMMAND):
        extra = re.search(r"-e '\.\[(\w+)\]'", command)
        assert extra, command
        assert extra[1] in project["optional-dependencies"]
    assert "asgi-worker" in project["scripts"]


def headings_slugs(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slugify(heading, "-") for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_relative_link_in_the_readme_leads_somewhere() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    relative = [link for link in links if not re.match(r"\w+:", link)]
    assert len(relative) >= 15  # the docs pages, the LICENSE and the CHANGELOG
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {path}, which does not exist"
        if anchor:
            assert anchor in headings_slugs(target), f"README links to {link}: no such heading"
