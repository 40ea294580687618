"""The README's promises: its testing example runs, and its config table is complete."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from asgi_worker import Config

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def readme_block(name: str) -> str:
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", README, re.S)
    assert match, f"README has no example block {name!r}"
    return match.group(1)


async def test_the_testing_example_passes() -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_block("testing"), "README.md", "exec"), namespace)
    await namespace["test_report_is_computed_in_the_background"]()


def test_every_config_field_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", README, re.M))
    fields = {spec.name for spec in dataclasses.fields(Config)}
    assert fields <= documented, f"missing in README: {sorted(fields - documented)}"


def test_every_test_the_failure_table_names_exists() -> None:
    section = README.split("## Failure modes", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(?:(test_\w+\.py)::)?(?:::)?(test_\w+)(?:\[[^\]]*\])?`", section)
    assert len(named) >= 19
    tests = Path(__file__).resolve().parent
    current = ""
    for file, name in named:
        current = file or current  # "`::name`" continues the file named before it
        source = (tests / current).read_text()
        assert re.search(rf"def {name}\(", source), f"{current}::{name} is not a test"
