"""The documentation under docs/: the site builds with no broken link, and its promises hold.

`mkdocs build --strict` (mkdocs.yml sets every link check to warn, and strict makes a
warning fail) is run into a temporary directory; a copy with one fault planted must fail
it, so the check is known to bite. The examples the pages run, the config table and the
failure table are checked against the code.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import asgi_worker
import asgi_worker.testing
import mkdocs_hooks
from asgi_worker import Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HOOKS_LINE = "  - mkdocs_hooks.py\n"


def docs_page(name: str) -> str:
    return (DOCS / name).read_text()


def docs_example(page: str, name: str) -> str:
    """The Python block that follows `<!-- docs-example: name -->` in docs/<page>."""
    match = re.search(rf"<!-- docs-example: {name} -->\n```python\n(.*?)```", docs_page(page), re.S)
    assert match, f"docs/{page} has no example block {name!r}"
    return match.group(1)


def build(config: Path, site: Path, *, api: bool = True) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict`; without the API reference (a second) unless `api`."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "API_REFERENCE": str(api).lower()},
    )


def test_the_site_builds_with_strict_link_checks(tmp_path: Path) -> None:
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    for page in DOCS.glob("*.md"):
        built = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / built).is_file(), f"docs/{page.name} was not built"
    # the repository files the pages link to from outside docs/ (mkdocs_hooks.py)
    assert (tmp_path / "site" / "repo" / "CHANGELOG" / "index.html").is_file()
    assert (tmp_path / "site" / "repo" / "benchmarks" / "results").is_dir()
    benchmarks = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert 'href="../repo/benchmarks/"' in benchmarks
    # the API reference, made from the docstrings by mkdocstrings
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("Config.from_env", "WorkerMiddleware", "invalidation.Invalidator.tag"):
        assert f'id="asgi_worker.{name}"' in reference, name
    assert 'id="asgi_worker.WorkerMiddleware._open"' not in reference  # private: left out
    assert "Expire every entry whose response carried" in reference


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    """A copy of mkdocs.yml, docs/ and the docs_src/ it includes to plant a fault in; the
    hooks are the real ones."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copytree(ROOT / "docs_src", tmp_path / "docs_src")
    config = (ROOT / "mkdocs.yml").read_text()
    assert HOOKS_LINE in config
    hooks = f"  - {ROOT / 'mkdocs_hooks.py'}\n"
    (tmp_path / "mkdocs.yml").write_text(config.replace(HOOKS_LINE, hooks))
    return tmp_path


def test_the_unchanged_copy_builds(docs_copy: Path) -> None:
    result = build(docs_copy / "mkdocs.yml", docs_copy / "site", api=False)
    assert result.returncode == 0, result.stdout + result.stderr


FAULTS = {  # a line planted in a page: what mkdocs says about it
    "[gone](no-such-page.md)": "'no-such-page.md', but the target is not found",
    "[gone](configuration.md#no-such-anchor)": "does not contain an anchor '#no-such-anchor'",
    "[gone](../no-such-file.md)": "'../no-such-file.md', but the target is not found",
    "![gone](../benchmarks/results/no-such.png)": "no-such.png', but the target is not found",
}


def test_each_broken_link_and_an_orphan_page_fail_the_build(docs_copy: Path) -> None:
    # One build for all: mkdocs reports every warning, then strict fails the build.
    page = docs_copy / "docs" / "backends.md"
    page.write_text(page.read_text() + "".join(f"\nSee {fault}.\n" for fault in FAULTS))
    (docs_copy / "docs" / "orphan.md").write_text("# Orphan\n")
    result = build(docs_copy / "mkdocs.yml", docs_copy / "site", api=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for fault, said in FAULTS.items():
        assert said in output, f"{fault} did not fail the build"
    assert "orphan.md" in output  # not in the nav
    assert "Aborted with 5 warnings in strict mode" in output


async def test_the_testing_example_passes() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(docs_example("testing.md", "testing"), "docs/testing.md", "exec"), namespace)
    await namespace["test_report_is_computed_in_the_background"]()


def test_the_api_reference_has_every_public_name() -> None:
    documented = set(re.findall(r"^::: (\S+)$", docs_page("reference.md"), re.M))
    public = [f"asgi_worker.{name}" for name in asgi_worker.__all__ if name != "__version__"]
    public += [f"asgi_worker.testing.{name}" for name in asgi_worker.testing.__all__]
    public += ["asgi_worker.invalidation.Invalidator", "asgi_worker.client"]
    public += [f"asgi_worker.stats.{name}" for name in ("collect_stats", "check_queue")]
    assert not set(public) - documented, "missing in docs/reference.md"


def test_the_configuration_example_builds_the_config_it_shows() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    source = docs_example("configuration.md", "configuration")
    exec(compile(source, "docs/configuration.md", "exec"), namespace)
    config = namespace["config"]
    assert (config.ttl, config.include, config.fail_open) == (600, ("/reports/*",), True)


def test_every_config_field_is_documented() -> None:
    documented = set(re.findall(r"^\| `(\w+)` \|", docs_page("configuration.md"), re.M))
    fields = {spec.name for spec in dataclasses.fields(Config)}
    assert fields <= documented, f"missing in docs/configuration.md: {sorted(fields - documented)}"


def test_the_config_table_is_made_from_the_field_docstrings() -> None:
    page = docs_page("configuration.md")
    assert mkdocs_hooks.with_config_table(page) == page, (
        "docs/configuration.md's table of fields differs from the docstrings in "
        "asgi_worker/core/config.py: run `python mkdocs_hooks.py`"
    )


def test_the_site_makes_the_config_table_afresh() -> None:
    start, end = mkdocs_hooks.TABLE_START, mkdocs_hooks.TABLE_END
    stale = f"# Configuration\n{start}| `ttl` | old |\n{end}End\n"
    page = SimpleNamespace(file=SimpleNamespace(src_uri="configuration.md"))
    built = mkdocs_hooks.on_page_markdown(stale, page, None, None)  # type: ignore[arg-type]
    table = mkdocs_hooks.config_table()
    assert built == stale.replace("| `ttl` | old |\n", table)
    rows = re.findall(r"^\| `(\w+)` \| ", table, re.M)
    assert rows == [spec.name for spec in dataclasses.fields(Config)]
    assert "| `claim_ttl` | `float` or `None` | `None` | Lease of the claim" in table
    assert "(see [The cache on Redis Cluster](cluster.md))" in table  # docs/cluster.md


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
