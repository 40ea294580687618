"""`KeyMemo`: the snapshots and digests of recently seen requests, by their scope parts.

Building a request's snapshot and hashing it is the largest piece of Python a cache hit
runs, and a hot URL brings the same scope parts again and again. The memo keys each entry
by every scope part `snapshot_from_scope` reads, so an entry is exactly what it would
build; where Python equality could make two different inputs look alike (an `int` port
and a `True`, `bytes` and `bytearray`), or a request is large, it is not used.
"""

from __future__ import annotations

from starlette.types import Scope

from asgi_worker.core.credentials import CredentialGuard
from asgi_worker.core.keys import RequestSnapshot, snapshot_from_scope
from asgi_worker.core.normalize import KeyRules

Keyed = tuple[RequestSnapshot, str]
"""A request's snapshot and its digest."""

# A hot set is small; the bound keeps the memo under ~1.5 MB even of the largest entries.
_MAX_ENTRIES = 1024
# Longer requests (path, query, keyed headers) are keyed afresh each time.
_MAX_PART_BYTES = 1024


class KeyMemo:
    """Snapshots and digests of the last `max_entries` distinct requests (oldest evicted).

    Not used with `Config.key_credentials`: credentials would sit in memory as keys.
    """

    def __init__(
        self,
        vary: tuple[str, ...],
        guard: CredentialGuard | None,
        rules: KeyRules | None = None,
        *,
        max_entries: int = _MAX_ENTRIES,
    ) -> None:
        self._vary = vary
        self._guard = guard
        self._rules = rules or KeyRules()
        # snapshot_from_scope reads the Host header (any of them) and the vary headers.
        self._keyed_headers = frozenset({b"host", *(name.encode("latin-1") for name in vary)})
        self._entries: dict[tuple[object, ...], Keyed] = {}
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, scope: Scope) -> Keyed:
        """`snapshot_from_scope(scope, vary, guard, rules)` and its digest, from memory if seen.

        An invalid or not allowed Host raises (`keys.InvalidHostError`) and is not kept.
        """
        parts = None if self._guard is not None else self._parts(scope)
        if parts is not None and (known := self._entries.get(parts)) is not None:
            return known
        snapshot = snapshot_from_scope(scope, self._vary, self._guard, self._rules)
        keyed = (snapshot, snapshot.digest)
        if parts is not None:
            if len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest entry
            self._entries[parts] = keyed
        return keyed

    def _parts(self, scope: Scope) -> tuple[object, ...] | None:
        """Every scope part the snapshot depends on, or None if the memo must not be used.

        Only exact types: equal parts then mean identical input. Headers are kept in
        their order, names lowercased as the snapshot does, all values of each.
        """
        scheme, root_path, path = scope.get("scheme"), scope.get("root_path"), scope.get("path")
        raw_path, query, server, app_root = (
            scope.get("raw_path"),
            scope.get("query_string"),
            scope.get("server"),
            scope.get("app_root_path"),  # Starlette's server root path, below a Mount
        )
        if not (
            type(scheme) is str
            and type(root_path) is str
            and (app_root is None or type(app_root) is str)
            and type(path) is str
            and (raw_path is None or type(raw_path) is bytes)
            and type(query) is bytes
            and (server is None or _plain_server(server))
        ):
            return None
        size = len(root_path) + len(path) + len(query) + (len(raw_path) if raw_path else 0)
        headers: list[tuple[bytes, bytes]] = []
        for name, value in scope.get("headers") or ():
            if type(name) is not bytes or type(value) is not bytes:
                return None
            lowered = name.lower()
            if lowered in self._keyed_headers:
                headers.append((lowered, value))
                size += len(value)
        if size > _MAX_PART_BYTES:
            return None
        return (scheme, root_path, app_root, path, raw_path, query, server, tuple(headers))


def _plain_server(server: object) -> bool:
    return (
        type(server) is tuple
        and len(server) == 2
        and (server[0] is None or type(server[0]) is str)
        and (server[1] is None or type(server[1]) is int)
    )
