"""The documentation under docs/ keeps its promises.

The examples the pages run, the config table and the failure table are checked against
the code.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from asgi_worker import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def docs_page(name: str) -> str:
    return (DOCS / name).read_text()


def docs_example(page: str, name: str) -> str:
    """The Python block that follows `<!-- docs-example: name -->` in docs/<page>."""
    match = re.search(rf"<!-- docs-example: {name} -->\n```python\n(.*?)```", docs_page(page), re.S)
    assert match, f"docs/{page} has no example block {name!r}"
    return match.group(1)


async def test_the_testing_example_passes() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(docs_example("testing.md", "testing"), "docs/testing.md", "exec"), namespace)
    await namespace["test_report_is_computed_in_the_background"]()


def test_every_config_field_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", docs_page("configuration.md"), re.M))
    fields = {spec.name for spec in dataclasses.fields(Config)}
    assert fields <= documented, f"missing in docs/configuration.md: {sorted(fields - documented)}"


def test_every_test_the_failure_table_names_exists() -> None:
    page = docs_page("failure-modes.md")
    named = re.findall(r"`(?:(test_\w+\.py)::)?(?:::)?(test_\w+)(?:\[[^\]]*\])?`", page)
    assert len(named) >= 19
    tests = Path(__file__).resolve().parent
    current = ""
    for file, name in named:
        current = file or current  # "`::name`" continues the file named before it
        source = (tests / current).read_text()
        assert re.search(rf"def {name}\(", source), f"{current}::{name} is not a test"
