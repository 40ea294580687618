"""Route patterns for metric labels and span names: bounded, never a raw path.

The middleware sits outside the router, so it does not know which route a path is for.
`RouteLabels` finds out as the router would: from the Starlette/FastAPI routes of the
served app (through `Mount`s, whose prefix is added; a mount with no routes of its own,
such as `StaticFiles`, is one pattern `/prefix/{path:path}`), the first route whose
pattern matches the path wins. Where that finds nothing (another framework, or a path
no route matches), a user-supplied `route` callable is asked; failing both, the label is
`"other"`.

Cardinality is bounded twice: labels are patterns of the app's own routes, and at most
`max_labels` distinct values are ever given out (further ones become `"other"`, so a
callable that returns raw paths cannot blow up the metrics store). Lookups are memoised
per path in a bounded table (cleared when full), so a hot path costs a dict read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from starlette.routing import BaseRoute, Mount, Route, Router, compile_path

from asgi_worker.core.app_layers import walk

OTHER = "other"
"""The label of a path no route matches, and of every label beyond the cap."""
DEFAULT_MAX_LABELS = 100
_MEMO_SIZE = 4096
_MAX_DEPTH = 8  # mounts inside mounts: deeper than any real app

RouteFunction = Callable[[str], str | None]
"""A user's route for a path (e.g. `lambda path: "/reports/{id}"`), or None: unknown."""


class RouteLabels:
    """Path -> route pattern, from the app's routes, a callable, or `OTHER`; bounded."""

    def __init__(
        self, route: RouteFunction | None = None, *, max_labels: int = DEFAULT_MAX_LABELS
    ) -> None:
        self._route = route
        self._max_labels = max_labels
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        self._given: set[str] = {OTHER}
        self._memo: dict[str, str] = {}

    def bind(self, app: Any) -> None:
        """Read the routes of `app` (the served app, or any app inside it)."""
        for node, _ in walk(app):
            if isinstance(node, Router):
                self._patterns = list(_patterns(node.routes, ""))
                self._memo.clear()
                return

    def __call__(self, path: str) -> str:
        """The label for `path`."""
        label = self._memo.get(path)
        if label is None:
            label = self._find(path)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()  # bounded: the hot paths come back at once
            self._memo[path] = label
        return label

    def _find(self, path: str) -> str:
        for regex, pattern in self._patterns:
            if regex.match(path):
                return self._bounded(pattern)
        if self._route is not None:
            try:
                found = self._route(path)
            except Exception:  # a label is not worth a failed request
                found = None
            if found:
                return self._bounded(found)
        return OTHER

    def _bounded(self, label: str) -> str:
        if label in self._given:
            return label
        if len(self._given) > self._max_labels:  # OTHER is one of them, not counted
            return OTHER
        self._given.add(label)
        return label


def _patterns(
    routes: list[BaseRoute], prefix: str, depth: int = 0
) -> Iterator[tuple[re.Pattern[str], str]]:
    """(regex of the whole path, pattern) for each route, mounts flattened, in order."""
    for route in routes:
        if isinstance(route, Route):
            pattern = prefix + route.path
            yield compile_path(pattern)[0], pattern
        elif isinstance(route, Mount):
            inner = route.routes
            if inner and depth < _MAX_DEPTH:
                yield from _patterns(list(inner), prefix + route.path, depth + 1)
            else:
                pattern = prefix + route.path + "/{path:path}"
                yield compile_path(pattern)[0], pattern
