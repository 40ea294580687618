"""The public API: the import paths the docs give work, and the old ones warn.

What users import is `asgi_worker` and its tool modules (docs/reference.md); everything
under the subpackages is internal. The flat layout's `asgi_worker.store` and
`asgi_worker.queue`, which the docs once named, still import, with a warning.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import asgi_worker

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = ("invalidation", "testing", "client", "stats", "dashboard")


def test_the_package_exports_what_the_docs_import() -> None:
    imported: set[str] = set()
    pages = [*ROOT.joinpath("docs").rglob("*.md"), ROOT / "README.md"]
    sources = [*pages, *ROOT.joinpath("docs_src").rglob("*.py")]
    for source in sources:
        for line in re.findall(
            r"^\s*from asgi_worker(\.\w+)? import ([\w, ]+)", source.read_text(), re.M
        ):
            module, names = line
            imported.update(f"asgi_worker{module}:{name.strip()}" for name in names.split(","))
    assert imported, "no import found in the docs"
    for spec in sorted(imported):
        module, name = spec.split(":")
        assert module == "asgi_worker" or module.removeprefix("asgi_worker.") in PUBLIC_MODULES, (
            f"the docs import {name} from an internal module, {module}"
        )
        assert hasattr(importlib.import_module(module), name), spec


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_each_public_module_lists_its_names(module: str) -> None:
    found = importlib.import_module(f"asgi_worker.{module}")
    names = getattr(found, "__all__", None)
    if module == "client":  # a module of functions, listed by its reference section
        names = ["fetch", "PendingTimeout"]
    assert names
    for name in names:
        assert hasattr(found, name), f"asgi_worker.{module}.{name}"


@pytest.mark.parametrize(("old", "name"), [("store", "Store"), ("queue", "JobQueue")])
def test_an_old_import_path_still_works_and_warns(old: str, name: str) -> None:
    # A fresh interpreter: the warning is given once, on the module's first import.
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        f"try:\n    from asgi_worker.{old} import {name}\n"
        "except DeprecationWarning as warning:\n    print('warned:', warning)\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        f"import asgi_worker.{old} as old, asgi_worker\n"
        f"assert old.{name} is asgi_worker.{name}\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (
        f"warned: asgi_worker.{old} is deprecated: import {name} from asgi_worker" in result.stdout
    )


def test_the_package_all_is_what_it_exports() -> None:
    for name in asgi_worker.__all__:
        assert hasattr(asgi_worker, name), name
