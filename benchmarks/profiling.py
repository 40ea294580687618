"""Sampling profiles with py-spy, summarised as the top costs by function (file:line).

`py-spy record --function --format raw` writes collapsed stacks: one line per distinct
stack, frames joined by `;`, each frame `function (file:first line)`, then the sample
count. We add up self time (the leaf frame) and inclusive time (every distinct frame of a
stack) per function, and self time per top-level package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = (
    "asgi_worker",
    "redis",
    "hiredis",
    "uvicorn",
    "httptools",
    "starlette",
    "fastapi",
    "msgpack",
    "arq",
    "asyncio",
    "uvloop",
)


@dataclass(frozen=True, slots=True)
class Profile:
    """What one py-spy recording found."""

    samples: int
    self_time: list[tuple[str, float]]
    """(frame, share of samples) for the leaf frames, largest first."""
    inclusive: list[tuple[str, float]]
    """(frame, share of samples) with callees counted in, largest first."""
    by_package: list[tuple[str, float]]
    """(package, share of samples) of self time."""
    raw_path: str


def py_spy() -> str | None:
    """The py-spy binary next to this interpreter, or on PATH."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, *, rate: int = 250) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` (non-blocking: the target is never paused)."""
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed in the benchmark environment")
    command = [binary, "record", "--pid", str(pid), "--duration", str(seconds)]
    command += ["--rate", str(rate), "--nonblocking", "--function", "--format", "raw"]
    command += ["--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _package(frame: str) -> str:
    location = frame.rpartition("(")[2]
    for package in PACKAGES:
        if location.startswith((f"{package}/", f"{package}.")) or f"/{package}/" in location:
            return package
    return "other"


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """(frames, outermost first; sample count) for each line of a collapsed-stacks file.

    A frame name can hold newlines (py-spy once named one after a Lua script's source),
    which splits its stack over lines that do not end in a count: those are skipped.
    """
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def summarise(raw: Path, *, top: int = 15) -> Profile:
    """Self and inclusive shares per function, and self share per package."""
    self_counts: Counter[str] = Counter()
    inclusive_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(raw):
        total += count
        self_counts[frames[-1]] += count
        package_counts[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive_counts[frame] += count
    if total == 0:
        raise RuntimeError(f"py-spy recorded no samples in {raw}")

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, count / total) for name, count in counter.most_common(n)]

    return Profile(
        samples=total,
        self_time=shares(self_counts, top),
        inclusive=shares(inclusive_counts, top),
        by_package=shares(package_counts, len(package_counts)),
        raw_path=str(raw),
    )


def inclusive_of(raw: Path, needle: str) -> list[tuple[str, float]]:
    """Inclusive shares of the frames whose text contains `needle` (e.g. `asgi_worker/`)."""
    counts: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(raw):
        total += count
        for frame in set(frames):
            if needle in frame:
                counts[frame] += count
    return [(name, count / total) for name, count in counts.most_common()] if total else []
