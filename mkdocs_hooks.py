"""mkdocs hooks: the repository files the pages link to, and the table of `Config` fields.

The pages link to files beside docs/ as GitHub shows them (`../benchmarks/README.md`,
`../CHANGELOG.md`), so every link works where the Markdown is read on GitHub too. The site
is built from docs/ alone: this hook adds each file of `REPO_FILES` to it as
`repo/<path>` and points the links at that copy. A link to any other file outside docs/
is left as it is, so `mkdocs build --strict` fails on it.

The table of `Config` fields in docs/configuration.md is made from the docstrings under
the fields in asgi_worker/core/config.py, their one source: this hook makes it afresh for the
site, and `python mkdocs_hooks.py` writes it into the page for GitHub's readers
(tests/test_docs.py fails while the page's copy differs).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

from asgi_worker.core.config import Config, field_docs

ROOT = Path(__file__).resolve().parent
PUBLISHED = "repo"
REPO_FILES = frozenset(
    {
        "CHANGELOG.md",
        "benchmarks/README.md",
        "benchmarks/results/requests_per_second.png",
    }
)
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")
CONFIG_PAGE = "configuration.md"
TABLE_START = (
    "<!-- config-table: made from the docstrings in asgi_worker/core/config.py by "
    "`python mkdocs_hooks.py`; edit those, not this table -->\n"
)
TABLE_END = "<!-- config-table end -->\n"
DOCS_LINK = re.compile(r"\bdocs/([\w-]+\.md)(#[\w-]+)?")


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add each file of `REPO_FILES` to the site, under `repo/`."""
    for path in sorted(REPO_FILES):
        source = ROOT / path
        files.append(File.generated(config, f"{PUBLISHED}/{path}", abs_src_path=str(source)))
    return files


def published(page_uri: str, target: str) -> str | None:
    """The link from `page_uri` to the published copy of `target`, if it is a repo file."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    here = posixpath.dirname(page_uri)
    resolved = posixpath.normpath(posixpath.join(here, target))
    if not resolved.startswith("../"):
        return None
    path = resolved.removeprefix("../")
    if path not in REPO_FILES:
        return None
    return posixpath.relpath(f"{PUBLISHED}/{path}", here or ".")


def back_into_docs(page_uri: str, target: str) -> str | None:
    """From a published repo file, the link to a docs page it names as `../docs/...`."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    here = posixpath.dirname(page_uri)
    resolved = posixpath.normpath(posixpath.join(here, target))
    if not resolved.startswith(f"{PUBLISHED}/docs/"):
        return None
    return posixpath.relpath(resolved.removeprefix(f"{PUBLISHED}/docs/"), here)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Point links to files of `REPO_FILES` at their published copies.

    A published repo file links within the repository as it is, but for its links into
    docs/, which are the site's own pages.
    """
    source = page.file.src_uri
    if source == CONFIG_PAGE:
        markdown = with_config_table(markdown)
    find = back_into_docs if source.startswith(f"{PUBLISHED}/") else published

    def repoint(match: re.Match[str]) -> str:
        target = find(source, match[2])
        return match[0] if target is None else f"{match[1]}{target}{match[3]}"

    return LINK.sub(repoint, markdown)


def with_config_table(page: str) -> str:
    """`page` with the table between `TABLE_START` and `TABLE_END` made afresh."""
    before, start, rest = page.partition(TABLE_START)
    _, end, after = rest.partition(TABLE_END)
    if not (start and end):
        raise ValueError(f"docs/{CONFIG_PAGE} has no {TABLE_START!r} ... {TABLE_END!r}")
    return f"{before}{TABLE_START}{config_table()}{TABLE_END}{after}"


def config_table() -> str:
    """The Markdown table of every `Config` field: name, type, default, meaning."""
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in field_docs(Config):
        kinds = " or ".join(f"`{kind.strip()}`" for kind in spec.type.split("|"))
        meaning = DOCS_LINK.sub(_page_link, " ".join(spec.doc.split()))
        if not meaning or "|" in meaning:  # a pipe would end the table's cell
            raise ValueError(f"Config.{spec.name}'s docstring is empty or has a |")
        rows.append(f"| `{spec.name}` | {kinds} | `{spec.default}` | {meaning} |")
    return "\n".join(rows) + "\n"


def _page_link(match: re.Match[str]) -> str:
    """A docstring's `docs/page.md#anchor` as a link to that page, under its title."""
    page, anchor = match[1], match[2] or ""
    title = (ROOT / "docs" / page).read_text().partition("\n")[0].removeprefix("# ")
    return f"[{title}]({page}{anchor})"


if __name__ == "__main__":
    # Writes the table into the page, for those who read docs/ on GitHub.
    path = ROOT / "docs" / CONFIG_PAGE
    path.write_text(with_config_table(path.read_text()))
