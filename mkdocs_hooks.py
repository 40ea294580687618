"""mkdocs hooks: the repository files that the pages under docs/ link to from outside it.

The pages link to files beside docs/ as GitHub shows them (`../benchmarks/README.md`,
`../CHANGELOG.md`), so every link works where the Markdown is read on GitHub too. The site
is built from docs/ alone: this hook adds each file of `REPO_FILES` to it as
`repo/<path>` and points the links at that copy. A link to any other file outside docs/
is left as it is, so `mkdocs build --strict` fails on it.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

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
    find = back_into_docs if source.startswith(f"{PUBLISHED}/") else published

    def repoint(match: re.Match[str]) -> str:
        target = find(source, match[2])
        return match[0] if target is None else f"{match[1]}{target}{match[3]}"

    return LINK.sub(repoint, markdown)
