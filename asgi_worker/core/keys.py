"""The request snapshot, the cache key made from it, and every Redis key name.

Pure functions, no I/O. docs/design.md, principle 1: the key *is* the snapshot (its hash), and
the worker replays exactly the snapshot, so a stored response can depend on nothing that
the key does not hold.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import msgpack
from starlette.types import Scope

from asgi_worker.core.credentials import CREDENTIAL_HEADERS, CredentialGuard
from asgi_worker.core.normalize import KeyRules, normalize_percent

# Bumped when the canonical form changes, so old entries are simply never looked up again.
_KEY_VERSION = b"aw3"
DEFAULT_PORTS = {"http": 80, "https": 443}
"""The port each scheme has when a URL names none."""

Headers = tuple[tuple[bytes, bytes], ...]
Client = tuple[str, int]
"""A client's address as the ASGI scope gives it: (host, port)."""

# RFC 3986 host: a reg-name (unreserved, pct-encoded, sub-delims), an IPv4 address (a
# reg-name too) or an IP literal in brackets; then an optional port of digits only.
_HOST = re.compile(
    r"(?P<name>[a-z0-9\-._~%!$&'()*+,;=]+|\[[0-9a-f:.]+\]|\[v[0-9a-f]+\.[a-z0-9\-._~!$&'()*+,;=:]+\])"
    r"(?::(?P<port>[0-9]*))?",
    re.ASCII,
)


class InvalidHostError(ValueError):
    """The Host header is not a valid `host[:port]` (RFC 9110 section 7.2)."""


class HostNotAllowedError(InvalidHostError):
    """The host is valid, and not one of `Config.allowed_hosts`."""


_EVERY_REQUEST = KeyRules()  # no patterns: percent-encoding and empty query segments only


def normalize_host(host: str, scheme: str) -> str:
    """`host` as keyed: lowercased, no trailing dot, no port when it is the scheme's default.

    Raises `InvalidHostError` for anything that is not `host[:port]` with a port of at
    most 65535 (leading zeros allowed, as RFC 3986 allows them), so a hostile Host can
    neither reach the replay nor make keys of its own.
    """
    match = _HOST.fullmatch(host.lower())
    if match is None:
        raise InvalidHostError(f"invalid Host header {host!r}")
    name, port = match["name"], match["port"]
    if not name.startswith("["):
        name = name.rstrip(".")
        if not name:
            raise InvalidHostError(f"invalid Host header {host!r}")
    if not port:  # absent, or empty as RFC 3986 allows: the default port
        return name
    # Keyed by value, not spelling: `:080` and `:80` are one port (RFC 3986: *DIGIT).
    digits = port.lstrip("0") or "0"
    if len(digits) > 5 or int(digits) > 65535:
        raise InvalidHostError(f"invalid port in Host header {host!r}")
    number = int(digits)
    return name if number == DEFAULT_PORTS.get(scheme) else f"{name}:{number}"


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
    """Normalised (`normalize_host`): what the replay sends as Host and takes `server` from."""
    root_path: str
    """The root path as the middleware saw it (a `Mount` above it adds its own prefix)."""
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
    server_root_path: str | None = None
    """The root path the server gave, where outer layers changed it: Starlette's `Mount`
    keeps it in `app_root_path`. None: the same as `root_path`. A replay that enters at
    the top of the app starts from it, and the outer layers add their part again."""
    client: Client | None = None
    """The address of the client whose request enqueued the job (`Config.replay_client`),
    replayed as the scope's `client`. Not keyed: every client of the key shares the
    answer its first client's request gave."""

    @property
    def entry_root_path(self) -> str:
        """The root path of the request as it came from the server."""
        return self.root_path if self.server_root_path is None else self.server_root_path

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
            None if self.server_root_path is None else _text(self.server_root_path),
        ]

    @classmethod
    def from_canonical(cls, items: list[Any]) -> RequestSnapshot:
        """Rebuild a snapshot from `canonical()`; `ValueError` if the values do not fit."""
        (
            scheme,
            host,
            root_path,
            path,
            raw_path,
            query_string,
            headers,
            credential_id,
            server_root,
        ) = items
        if not (
            isinstance(credential_id, bytes)
            and (server_root is None or isinstance(server_root, bytes))
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
            server_root_path=(
                None if server_root is None else server_root.decode("utf-8", "surrogatepass")
            ),
        )

    @property
    def digest(self) -> str:
        """A fixed-length hash of the request: 32 hex digits, its path's slot tag first.

        The first 8 (`path_tag` of the path) put every key of the request in the Redis
        Cluster slot of its path, beside the path's index, stamp and durations, so one
        script may touch them all; the other 24 are a 96-bit hash of the canonical request.
        """
        packed = msgpack.packb([_KEY_VERSION, *self.canonical()], use_bin_type=True)
        return path_tag(self.path) + hashlib.blake2b(packed, digest_size=12).hexdigest()


def snapshot_from_scope(
    scope: Scope,
    vary: tuple[str, ...],
    guard: CredentialGuard | None = None,
    rules: KeyRules = _EVERY_REQUEST,
) -> RequestSnapshot:
    """Take the keyed parts of an HTTP scope, in canonical form (see normalize.py).

    `vary` holds lowercased header names. With a `guard` (`Config.key_credentials`) the
    credential headers are taken too. Raises `InvalidHostError` for a Host header that is
    not a valid `host[:port]`, `HostNotAllowedError` for a host `rules` do not allow.
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
    root_path = str(scope.get("root_path") or "")
    server_root = scope.get("app_root_path")
    keyed_host = normalize_host(host.decode("latin-1"), scheme) if host else ""
    keyed_host = keyed_host or _server_host(scope, scheme)
    if not rules.allows(keyed_host):
        raise HostNotAllowedError(f"host {keyed_host!r} is not in Config.allowed_hosts")
    return RequestSnapshot(
        scheme=scheme,
        host=keyed_host,
        root_path=root_path,
        path=str(scope.get("path") or "/"),
        raw_path=normalize_percent(bytes(raw_path)) if raw_path is not None else None,
        query_string=rules.query(bytes(scope.get("query_string") or b"")),
        # sorted() is stable: several values of one header keep their order.
        headers=tuple(sorted(kept, key=lambda pair: pair[0])),
        credentials=tuple(credentials),
        credential_id=guard.identify(tuple(credentials)) if guard and credentials else b"",
        server_root_path=(
            str(server_root) if server_root is not None and server_root != root_path else None
        ),
    )


def scope_client(scope: Scope) -> Client | None:
    """The scope's `client` as (host, port), or None if it has none of that shape.

    A host that is not valid text (a lone surrogate) counts as none: it could not be
    put in a job.
    """
    client = scope.get("client")
    try:
        host, port = client  # type: ignore[misc]
    except (TypeError, ValueError):
        return None
    if not (isinstance(host, str) and isinstance(port, int) and not isinstance(port, bool)):
        return None
    try:
        host.encode()
    except UnicodeEncodeError:
        return None
    return host, port


def request_target(snapshot: RequestSnapshot) -> str:
    """`/path?query` of a snapshot, as the request line has it (no query: the path)."""
    query = snapshot.query_string.decode("latin-1")
    return f"{snapshot.path}?{query}" if query else snapshot.path


def request_line(snapshot: RequestSnapshot) -> str:
    """`GET /path?query` for logs, control characters escaped (a log line stays one line).

    A replay is always a GET: a HEAD is served from what its GET stored.
    """
    return f"GET {printable(request_target(snapshot))}"


def printable(text: str) -> str:
    """`text` with its control characters escaped, for one log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _server_host(scope: Scope, scheme: str) -> str:
    server = scope.get("server")
    if not server or server[0] is None:
        return ""
    host, port = _latin1(str(server[0])).lower(), server[1]
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address, written as a Host header writes it
    return host if port in (None, DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"


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


TAG_LENGTH = 8
"""Hex digits of a path's hash tag (32 bits: slots spread evenly, keys stay short)."""


def path_tag(path: str) -> str:
    """The Redis Cluster hash tag of `path`: every key of the path and its requests has it."""
    return _sha1(path)[:TAG_LENGTH]


def wake_key(queue_name: str) -> str:
    """The list each enqueue pushes a token on, and idle workers block on (BLPOP)."""
    return queue_name + ":wake"


def alive_key(queue_name: str, worker: str) -> str:
    """The heartbeat key of the worker named `worker` (see worker/heartbeat.py)."""
    return f"{alive_prefix(queue_name)}{worker}"


def alive_prefix(queue_name: str) -> str:
    """What every worker's heartbeat key on the queue starts with."""
    return queue_name + ":alive:"


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """Every Redis key name the cache writes, in one place (as arq's constants.py does).

    One layout on a single Redis and on a Cluster. Every name holds a Cluster hash tag
    (`{...}`), and what one script touches shares one:

    - a path's tag (`path_tag`, the digest's first 8 hex digits): its requests' entries,
      freshness marks, claims and stamps, and the path's index, stamp and durations;
    - a tag's own (`{tag:<sha1>}`): its index and stamp;
    - `{paths}`: the path list for prefix and glob invalidation, in two sorted sets.

    Work that spans them (the path list, tags) is done in separate single-slot steps;
    scripts.py and store.py say how each race between them is closed.
    """

    prefix: str

    def _request(self, digest: str) -> str:
        return f"{self.prefix}:{{{digest[:TAG_LENGTH]}}}{digest[TAG_LENGTH:]}"

    def response(self, digest: str) -> str:
        """Where the encoded stored response lives."""
        return f"{self._request(digest)}:resp"

    def fresh(self, digest: str) -> str:
        """Present while the entry is fresh; the entry outlives it by the stale window."""
        return f"{self._request(digest)}:fresh"

    def claim(self, digest: str) -> str:
        """The lease that says one job for this request exists."""
        return f"{self._request(digest)}:claim"

    def body(self, digest: str, version: str) -> str:
        """A body stored apart from its entry (`Config.stream_body_bytes`): one per version.

        In the entry's slot: its scripts reach it by the name `body_ref` holds.
        """
        return f"{self._request(digest)}:body:{version}"

    def body_ref(self, digest: str) -> str:
        """The name of the `body` key of the entry stored now, while it has one."""
        return f"{self._request(digest)}:bodyref"

    def entry_stamp(self, digest: str) -> str:
        """When a tag invalidation last reached this entry (store clock, µs).

        Refuses a job of the entry that began before, whose commit had not yet stored
        when the invalidation walked the tag's index (see scripts.TAG_ADD).
        """
        return f"{self._request(digest)}:inv"

    def events(self) -> str:
        """Pub/sub channel of stored digests and invalidations (see events.py)."""
        return f"{self.prefix}:events"

    # Invalidation indexes. Every index is a sorted set scored by when what it names
    # expires (ms, store clock), so each write can forget a few expired members (see
    # scripts.py): bounded size. Names hold the full SHA-1 of the path or tag: paths
    # that share a hash tag still have indexes of their own.

    def _path(self, path: str, kind: str) -> str:
        digest = _sha1(path)
        return f"{self.prefix}:{{{digest[:TAG_LENGTH]}}}:{kind}:{digest}"

    def paths(self) -> str:
        """Sorted set (all scores 0, so ordered by bytes) of stored paths: prefix queries."""
        return f"{self.prefix}:{{paths}}"

    def paths_by_expiry(self) -> str:
        """The same paths scored by when to check whether they still hold anything live."""
        return f"{self.prefix}:{{paths}}:expiry"

    def path_listings(self) -> str:
        """Hash of path -> how often a claim listed it.

        A path is delisted only if its count did not move since its index was read
        (scripts.DELIST_PATH).
        """
        return f"{self.prefix}:{{paths}}:listings"

    def path_index(self, path: str) -> str:
        """Sorted set of one path's entries and running claims, scored by when each ends.

        An entry's member is its digest and raw query (the digest has a fixed length, 32
        hex digits, so the query is the rest); a claim's, `~` and the `claim` key's name,
        until its job commits.
        """
        return self._path(path, "idx")

    def path_stamp(self, path: str) -> str:
        """When the path was last invalidated (store clock, µs)."""
        return self._path(path, "inv")

    def durations(self, path: str) -> str:
        """Hash of path -> moving average of its job durations in ms (adaptive Retry-After).

        One hash per path, in the path's slot (the commit updates it); the field is the
        path, so the fair-queueing clock (scripts.ENQUEUE) reads it as before.
        """
        return self._path(path, "dur")

    def fair_clock(self, path: str) -> str:
        """When the path's next job is due under fair queueing (`queue_scripts.ENQUEUE`).

        On the queue's Redis, which is never a Cluster: no hash tag needed.
        """
        return f"{self.prefix}:clock:{_sha1(path)}"

    def durations_pattern(self) -> str:
        """Matches every `durations` key (for SCAN: `asgi-worker stats`)."""
        return f"{_glob_escape(self.prefix)}:{{*}}:dur:*"

    def tag_hash(self, tag: str) -> str:
        """The part of a tag's key names that stands for the tag."""
        return _sha1(tag)

    def tag(self, tag: str) -> str:
        """Sorted set of the digests of entries that carried the tag, scored by expiry."""
        return f"{self.prefix}:{{tag:{_sha1(tag)}}}:idx"

    def tag_stamp(self, tag: str) -> str:
        """When the tag was last invalidated (store clock, µs)."""
        return f"{self.prefix}:{{tag:{_sha1(tag)}}}:inv"

    def job_id(self, digest: str, token: str) -> str:
        """The arq job id: unique per claim, so a re-claim never collides with a dead job."""
        return f"{self.prefix}:{digest}:{token}"

    def progress(self, job_id: str) -> str:
        """Hash of the job's latest progress (`progress.Progress.fields`), while it runs.

        On the queue's Redis, beside arq's keys of the job (never a Cluster).
        """
        return f"{self.prefix}:progress:{job_id}"

    def minute_counts(self, minute: int) -> str:
        """Hash of one minute's hits, misses and lookup latency (`Config.dashboard_counts`).

        `minute` is Unix seconds // 60. On the queue's Redis, as `recent_jobs`.
        """
        return f"{self.prefix}:dash:minute:{minute}"

    def recent_jobs(self) -> str:
        """Capped list of the latest jobs' path, duration and outcome, newest first.

        On the queue's Redis (`Config.dashboard_counts`), where every worker writes it.
        """
        return f"{self.prefix}:dash:recent"

    # Glob patterns (for SCAN). Config keeps glob characters out of the prefix, except a
    # backslash, which is escaped here.

    def requests_pattern(self) -> str:
        """Matches the `response`, `fresh` and `claim` keys of every request (and more)."""
        return f"{_glob_escape(self.prefix)}:{{*}}*"

    def job_ids_pattern(self) -> str:
        """Matches every `job_id` (and not those of a prefix that merely starts with ours)."""
        return f"{_glob_escape(self.prefix)}:{'[0-9a-f]' * 32}:*"


def _glob_escape(text: str) -> str:
    return text.replace("\\", "\\\\")


def _sha1(text: str) -> str:
    return hashlib.sha1(_text(text), usedforsecurity=False).hexdigest()
