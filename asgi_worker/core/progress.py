"""A job's progress, as its handler reports it: the value and how it is written down.

Pure data, no I/O. A handler calls `asgi_worker.report_progress` (worker/progress.py);
the queue that runs the job keeps its latest `Progress` where a `202` and the dashboard
read it: `RedisKeys.progress` on the queue's Redis, or the in-process queue's memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_MESSAGE_LENGTH = 200
"""Characters of a progress message kept: it is a status line, not a log."""

WRITE_EVERY = 0.25
"""Seconds between two writes of one job's progress at most: a handler may report in a
tight loop, the queue's Redis sees at most four writes a second per job."""

KEEP_AFTER_END = 5.0
"""Seconds a job's last progress is kept after it ends: a client polling then gets the
stored response, not the progress, so nothing needs it for long."""


@dataclass(frozen=True, slots=True)
class Progress:
    """How far one job got: `done` of `total`, or `done` alone as a fraction."""

    done: float
    total: float | None = None
    message: str | None = None
    at: float = 0.0
    """When it was reported, in Unix seconds (the reporting host's clock)."""

    @property
    def fraction(self) -> float | None:
        """`done / total`, or `done` itself without a total, within 0..1; None if unknown."""
        if self.total is not None:
            if self.total <= 0:
                return None
            value = self.done / self.total
        else:
            value = self.done
        if not math.isfinite(value):
            return None
        return min(max(value, 0.0), 1.0)

    def fields(self) -> dict[str, str]:
        """As the fields of a Redis hash (every value a string; absent values left out)."""
        written = {"done": repr(self.done), "at": repr(self.at)}
        if self.total is not None:
            written["total"] = repr(self.total)
        if self.message is not None:
            written["message"] = self.message
        return written

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Progress | None:
        """The `Progress` that `fields` wrote; None for an empty or unreadable hash.

        The hash is written by workers, possibly of another version: anything that does
        not read as numbers is no progress, never an error on the reading side.
        """
        text = {
            (k.decode() if isinstance(k, bytes) else k): (
                v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            )
            for k, v in fields.items()
        }
        try:
            done = float(text["done"])
            total = float(text["total"]) if "total" in text else None
            at = float(text.get("at", "0"))
        except (KeyError, ValueError):
            return None
        return cls(done, total, text.get("message"), at)


def checked(done: float, total: float | None, message: str | None, at: float) -> Progress:
    """The `Progress` a handler reported, or `TypeError`/`ValueError` saying what is wrong.

    A message is cut to `MAX_MESSAGE_LENGTH` characters, and line breaks become spaces
    (it is shown on one line).
    """
    for name, value in (("done", done), ("total", total)):
        if value is None and name == "total":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"report_progress: {name} must be a number, not {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"report_progress: {name} must be a finite number >= 0, not {value}")
    if message is not None:
        if not isinstance(message, str):
            raise TypeError(f"report_progress: message must be a str, not {message!r}")
        message = " ".join(message.split())[:MAX_MESSAGE_LENGTH]
    return Progress(float(done), None if total is None else float(total), message, at)
