"""The request snapshot, the cache key made from it, and every Redis key name.

Pure functions, no I/O. DESIGN.md principle 1: the key *is* the snapshot (its hash), and
the worker replays exactly the snapshot, so a stored response can depend on nothing that
the key does not hold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
from starlette.types import Scope

from .credentials import CREDENTIAL_HEADERS, CredentialGuard

# Bumped when the canonical form changes, so old entries are simply never looked up again.
_KEY_VERSION = b"aw1"
_DEFAULT_PORTS = {"http": 80, "https": 443}

Headers = tuple[tuple[bytes, bytes], ...]


def header_pairs(value: Any) -> Headers:
    """Decoded msgpack `[[name, value], ...]` as `Headers`; `ValueError` for anything else."""
    if not isinstance(value, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, bytes) for p in pair)
        for pair in value
    ):
        raise ValueError("headers are not a list of [bytes, bytes] pairs")
    return tuple((name, raw) for name, raw in value)


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """The keyed parts of a GET request: all the worker knows of it when it replays."""

    scheme: str
    host: str
    root_path: str
    path: str
    raw_path: bytes | None
    query_string: bytes
    headers: Headers
    """Only the configured `vary` headers, names lowercased, sorted by name."""
    credentials: Headers = ()
    """`Authorization`/`Cookie`, only with `Config.key_credentials`: replayed, never keyed
    in clear (the key holds `credential_id`) and sealed whenever encoded."""
    credential_id: bytes = b""
    """A keyed MAC of `credentials` (see credentials.py); part of the key."""

    def canonical(self) -> list[Any]:
        """The keyed part as plain msgpack-able values: the same request, the same list.

        `credentials` are left out: they are keyed through `credential_id` only.
        """
        return [
            self.scheme,
            self.host,
            _text(self.root_path),
            _text(self.path),
            self.raw_path,
            self.query_string,
            [list(pair) for pair in self.headers],
            self.credential_id,
        ]

    @classmethod
    def from_canonical(cls, items: list[Any]) -> RequestSnapshot:
        """Rebuild a snapshot from `canonical()`; `ValueError` if the values do not fit."""
        scheme, host, root_path, path, raw_path, query_string, headers, credential_id = items
        if not (
            isinstance(credential_id, bytes)
            and isinstance(scheme, str)
            and isinstance(host, str)
            and isinstance(root_path, bytes)
            and isinstance(path, bytes)
            and (raw_path is None or isinstance(raw_path, bytes))
            and isinstance(query_string, bytes)
        ):
            raise ValueError("request snapshot has fields of the wrong type")
        return cls(
            scheme=scheme,
            host=host,
            root_path=root_path.decode("utf-8", "surrogatepass"),
            path=path.decode("utf-8", "surrogatepass"),
            raw_path=raw_path,
            query_string=query_string,
            headers=header_pairs(headers),
            credential_id=credential_id,
        )

    @property
    def digest(self) -> str:
        """A fixed-length hash of the canonical request: 32 hex digits (128 bits)."""
        packed = msgpack.packb([_KEY_VERSION, *self.canonical()], use_bin_type=True)
        return hashlib.blake2b(packed, digest_size=16).hexdigest()


def snapshot_from_scope(
    scope: Scope, vary: tuple[str, ...], guard: CredentialGuard | None = None
) -> RequestSnapshot:
    """Take the keyed parts of an HTTP scope. `vary` holds lowercased header names.

    With a `guard` (`Config.key_credentials`) the credential headers are taken too.
    """
    host = b""
    wanted = {name.encode("latin-1") for name in vary}
    kept: list[tuple[bytes, bytes]] = []
    credentials: list[tuple[bytes, bytes]] = []
    for name, value in scope.get("headers") or ():
        lowered = bytes(name).lower()
        if lowered == b"host" and not host:
            host = bytes(value)
        elif lowered in wanted:
            kept.append((lowered, bytes(value)))
        elif guard is not None and lowered in CREDENTIAL_HEADERS:
            credentials.append((lowered, bytes(value)))
    credentials.sort(key=lambda pair: pair[0])
    scheme = _latin1(str(scope.get("scheme") or "http"))
    raw_path = scope.get("raw_path")
    return RequestSnapshot(
        scheme=scheme,
        host=host.decode("latin-1").lower() if host else _server_host(scope, scheme),
        root_path=str(scope.get("root_path") or ""),
        path=str(scope.get("path") or "/"),
        raw_path=bytes(raw_path) if raw_path is not None else None,
        query_string=bytes(scope.get("query_string") or b""),
        # sorted() is stable: several values of one header keep their order.
        headers=tuple(sorted(kept, key=lambda pair: pair[0])),
        credentials=tuple(credentials),
        credential_id=guard.identify(tuple(credentials)) if guard and credentials else b"",
    )


def _server_host(scope: Scope, scheme: str) -> str:
    server = scope.get("server")
    if not server or server[0] is None:
        return ""
    host, port = _latin1(str(server[0])).lower(), server[1]
    return host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"


def _latin1(value: str) -> str:
    """`value` as header-safe (Latin-1) text.

    Any character, lone surrogates included, survives as its UTF-8 bytes read as Latin-1,
    which is what a Host header would carry on the wire.
    """
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("latin-1")
    return value


def _text(value: str) -> bytes:
    # Servers may hand us paths with lone surrogates; keep them distinct, never crash.
    return value.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Every Redis key name the cache writes, in one place (as arq's constants.py does).

    The digest is wrapped in braces, a Redis Cluster hash tag, so all keys of one request
    live in one slot and one Lua script may touch them all.
    """

    prefix: str

    def response(self, digest: str) -> str:
        """Where the encoded stored response lives."""
        return f"{self.prefix}:{{{digest}}}:resp"

    def fresh(self, digest: str) -> str:
        """Present while the entry is fresh; the entry outlives it by the stale window."""
        return f"{self.prefix}:{{{digest}}}:fresh"

    def claim(self, digest: str) -> str:
        """The lease that says one job for this request exists."""
        return f"{self.prefix}:{{{digest}}}:claim"

    def events(self) -> str:
        """Pub/sub channel of stored digests and invalidations (see events.py)."""
        return f"{self.prefix}:events"

    # Invalidation indexes. Names hash the path or tag with SHA-1, which the Lua scripts
    # can compute too (redis.sha1hex); it bounds the key length, nothing more. The commit
    # script names these keys itself (store.py); a store test checks that the two agree.

    def paths(self) -> str:
        """Sorted set (all scores 0, so ordered by bytes) of stored paths: prefix queries."""
        return f"{self.prefix}:paths"

    def paths_by_expiry(self) -> str:
        """The same paths scored by when their newest entry expires: for pruning."""
        return f"{self.prefix}:paths:expiry"

    def path_index(self, path: str) -> str:
        """Hash of the entries of one path: digest -> raw query string."""
        return f"{self.prefix}:path:{_sha1(path)}"

    def path_stamp(self, path: str) -> str:
        """When the path was last invalidated (store clock, µs)."""
        return f"{self.prefix}:inv:path:{_sha1(path)}"

    def durations(self) -> str:
        """Hash of path -> moving average of its job durations in ms (adaptive Retry-After)."""
        return f"{self.prefix}:durations"

    def tag_hash(self, tag: str) -> str:
        """The part of a tag's key names that stands for the tag."""
        return _sha1(tag)

    def tag(self, tag: str) -> str:
        """Set of the digests of entries that carried the tag."""
        return f"{self.prefix}:tag:{_sha1(tag)}"

    def tag_stamp(self, tag: str) -> str:
        """When the tag was last invalidated (store clock, µs)."""
        return f"{self.prefix}:inv:tag:{_sha1(tag)}"

    def job_id(self, digest: str, token: str) -> str:
        """The arq job id: unique per claim, so a re-claim never collides with a dead job."""
        return f"{self.prefix}:{digest}:{token}"

    # Glob patterns (for SCAN). Config keeps glob characters out of the prefix, except a
    # backslash, which is escaped here.

    def requests_pattern(self) -> str:
        """Matches the `response`, `fresh` and `claim` keys of every request."""
        return f"{_glob_escape(self.prefix)}:{{*}}:*"

    def job_ids_pattern(self) -> str:
        """Matches every `job_id` (and not those of a prefix that merely starts with ours)."""
        return f"{_glob_escape(self.prefix)}:{'[0-9a-f]' * 32}:*"


def _glob_escape(text: str) -> str:
    return text.replace("\\", "\\\\")


def _sha1(text: str) -> str:
    return hashlib.sha1(_text(text), usedforsecurity=False).hexdigest()
