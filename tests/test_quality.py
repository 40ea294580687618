"""The package stays `ruff` and `mypy --strict` clean: checked by the same test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format() -> None:
    lint = run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = run(str(BIN / "ruff"), "format", "--check", ".")
    assert form.returncode == 0, form.stdout + form.stderr


def test_mypy_strict() -> None:
    result = run(str(BIN / "mypy"), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
