"""The JSON body of a `202`: where the request's job stands, for a client that asks.

A client that sends `Accept: application/json` gets
`{"status", "progress", "message", "position", "eta_seconds"}` (docs/progress.md);
every other client the empty `202` it always got. Pure functions: the middleware reads
the state (`JobQueue.state`) and the path's typical duration, this module writes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from asgi_worker.backends.base import JobState


def accepts_json(accept: Iterable[bytes]) -> bool:
    """Whether the `Accept` header values name `application/json` with a q above 0.

    Named, not matched by a wildcard: a browser's `*/*` or `text/html, */*` keeps the
    empty `202` (RFC 9110 section 12.5.1: q=0 means "not acceptable").
    """
    for value in accept:
        for item in value.split(b","):
            media, _, parameters = item.partition(b";")
            if media.strip().lower() != b"application/json":
                continue
            return _quality(parameters) > 0
    return False


def _quality(parameters: bytes) -> float:
    for parameter in parameters.split(b";"):
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0  # a q we cannot read: not a clear yes
    return 1.0


def state_body(state: JobState | None, typical: float | None, slots: int) -> bytes:
    """The `202`'s JSON for `state` (None: the job is between two states, or not known).

    `eta_seconds` comes from `typical`, the path's typical job duration (None: no job of
    the path has been timed yet): what is left of it by the job's progress while it
    runs; behind `position` queued jobs on `slots` worker slots, the waits before it too.
    """
    progress = None if state is None else state.progress
    fraction = None if progress is None else progress.fraction
    eta = None
    if typical is not None:
        if state is not None and state.status == "running":
            eta = typical * (1.0 - (fraction or 0.0))
        else:
            ahead = 0 if state is None or state.position is None else state.position
            eta = typical * (1 + ahead // max(slots, 1))
    return json.dumps(
        {
            "status": "queued" if state is None else state.status,
            "progress": None if fraction is None else round(fraction, 4),
            "message": None if progress is None else progress.message,
            "position": None if state is None else state.position,
            "eta_seconds": None if eta is None else round(eta, 1),
        },
        separators=(",", ":"),
    ).encode()
