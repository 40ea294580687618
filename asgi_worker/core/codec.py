"""msgpack encoding of what crosses Redis: stored responses and request snapshots.

Every encoded value starts with a format version, so a future format can be told apart
and an old or foreign value is refused with `CorruptEntryError` instead of misread.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from asgi_worker.core.credentials import CredentialGuard
from asgi_worker.core.keys import Headers, RequestSnapshot, header_pairs

_RESPONSE_V1 = 1
_HEAD_V2 = 2  # a response whose body is stored apart: its head and where the body is
_CODED_V3 = 3  # a response whose body is gzip the cache can also serve decoded (`Coded`)
_SNAPSHOT_V2 = 2  # 2: the server root path added
_SNAPSHOT_V3 = 3  # 3: the client's address added (version 2 is still read)


class CorruptEntryError(ValueError):
    """Bytes that are not a value this version of asgi-worker wrote."""


@dataclass(frozen=True, slots=True)
class Apart:
    """Where a body stored apart from its entry is (see `Config.stream_body_bytes`)."""

    version: str
    """Names the body's key: each stored response's body has a key of its own, so a
    newer commit never mixes with an older body a hit is still reading."""
    length: int
    """The body's size in bytes."""


@dataclass(frozen=True, slots=True)
class Coded:
    """A stored body in a coding the cache can also serve decoded (docs/compression.md).

    Gzip, compressed by the worker or by the app itself.
    """

    coding: str
    """The body's coding: "gzip" (the only one written)."""
    identity_length: int
    """The decoded body's size in bytes."""
    by_cache: bool
    """True: the worker compressed it, and the headers are the app's, of the decoded
    bytes (no `Content-Encoding`, its `Content-Length` and ETag). False: the app sent it
    coded, and the headers are the app's, of the coded bytes."""


_CODINGS = frozenset({"gzip"})


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A complete response as the app sent it, ready to be served again."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float
    """Unix time the worker finished the response, on the store's clock (Redis's `TIME`,
    see `Store.list_path`), for `Age`: the web process compares it with the store's time
    of its lookup (`Lookup.now`), never with its own clock."""
    hit_for_pass: bool = False
    """A marker, not a response: the app's answer was private, so requests for this key
    go straight to the app until the marker expires (Varnish's hit-for-pass)."""
    apart: Apart | None = None
    """The body is stored apart (`body` is empty): read it with `Store.read_body`."""
    coded: Coded | None = None
    """The body is gzip, to serve as it is or decoded (`representations.select`)."""

    @property
    def length(self) -> int:
        """The body's size, whether it is here or stored apart."""
        return len(self.body) if self.apart is None else self.apart.length


def encode_response(response: StoredResponse) -> bytes:
    """Pack a response for Redis: whole, or only its head if its body is stored apart."""
    head = [response.status, [list(pair) for pair in response.headers]]
    if response.apart is not None:
        apart = response.apart
        return _pack([_HEAD_V2, *head, response.stored_at, apart.version, apart.length])
    if response.coded is not None:  # version 1 otherwise: what releases before read
        coded = response.coded
        fields = [coded.coding, coded.identity_length, coded.by_cache]
        return _pack([_CODED_V3, *head, response.body, response.stored_at, *fields])
    return _pack([_RESPONSE_V1, *head, response.body, response.stored_at, response.hit_for_pass])


def decode_response(data: bytes) -> StoredResponse:
    """Unpack a response; `CorruptEntryError` for anything `encode_response` did not make."""
    items = _unpack(data, {_RESPONSE_V1: 6, _HEAD_V2: 6, _CODED_V3: 8})
    apart = coded = None
    if items[0] == _CODED_V3:
        _, status, headers, body, stored_at, coding, identity_length, by_cache = items
        hit_for_pass = False
        if not (
            isinstance(coding, str)
            and coding in _CODINGS
            and type(identity_length) is int
            and identity_length >= 0
            and isinstance(by_cache, bool)
        ):
            raise CorruptEntryError("stored coding is not one this version reads")
        coded = Coded(coding, identity_length, by_cache)
    elif items[0] == _HEAD_V2:
        _, status, headers, stored_at, version, length = items
        body, hit_for_pass = b"", False
        if not (_is_version(version) and type(length) is int and length >= 0):
            raise CorruptEntryError("stored head names its body wrongly")
        apart = Apart(version, length)
    else:
        _, status, headers, body, stored_at, hit_for_pass = items
    if not (
        isinstance(hit_for_pass, bool)
        and isinstance(status, int)
        and (100 <= status <= 999 or (hit_for_pass and status == 0))
        and isinstance(body, bytes)
        and isinstance(stored_at, int | float)
        and math.isfinite(stored_at)
    ):
        raise CorruptEntryError("stored response has fields of the wrong type")
    try:
        pairs = header_pairs(headers)
    except ValueError as error:
        raise CorruptEntryError(str(error)) from None
    return StoredResponse(
        status=status,
        headers=pairs,
        body=body,
        stored_at=float(stored_at),
        hit_for_pass=hit_for_pass,
        apart=apart,
        coded=coded,
    )


def _is_version(value: Any) -> bool:
    """A body version as the worker makes them: a few hex digits (it names a key)."""
    return isinstance(value, str) and 0 < len(value) <= 32 and all(c in _HEX for c in value)


_HEX = frozenset("0123456789abcdef")


def encode_snapshot(snapshot: RequestSnapshot, guard: CredentialGuard | None = None) -> bytes:
    """Pack a request snapshot for a job; credentials are sealed with `guard`."""
    sealed = b""
    if snapshot.credentials:
        if guard is None:
            raise ValueError("a snapshot with credentials is only encoded sealed")
        sealed = guard.seal(_pack([list(pair) for pair in snapshot.credentials]))
    client = None if snapshot.client is None else list(snapshot.client)
    return _pack([_SNAPSHOT_V3, *snapshot.canonical(), sealed, client])


def decode_snapshot(data: bytes, guard: CredentialGuard | None = None) -> RequestSnapshot:
    """Unpack a snapshot; `CorruptEntryError` for anything `encode_snapshot` did not make.

    Version 2 snapshots (jobs queued by the release before) are read too, with no client.
    """
    snapshot, sealed = _decode_snapshot(data)
    if not sealed:
        return snapshot
    try:
        if guard is None:
            raise ValueError("the job carries sealed credentials, and no secret is configured")
        credentials = header_pairs(msgpack.unpackb(guard.open(sealed), raw=False))
    except (ValueError, TypeError) as error:
        raise CorruptEntryError(str(error)) from None
    return dataclasses.replace(snapshot, credentials=credentials)


def peek_snapshot(data: bytes) -> RequestSnapshot:
    """The request of an encoded snapshot, its credentials (if any) left sealed: for logs."""
    return _decode_snapshot(data)[0]


def _decode_snapshot(data: bytes) -> tuple[RequestSnapshot, bytes]:
    """The snapshot without its credentials, and the credentials still sealed."""
    items = _unpack(data, {_SNAPSHOT_V3: 12, _SNAPSHOT_V2: 11})
    client = items.pop() if items[0] == _SNAPSHOT_V3 else None
    sealed = items[-1]
    try:
        snapshot = RequestSnapshot.from_canonical(items[1:-1])
        if client is not None:
            snapshot = dataclasses.replace(snapshot, client=_client(client))
        if not isinstance(sealed, bytes):
            raise ValueError("sealed credentials are not bytes")
    except (ValueError, TypeError) as error:
        raise CorruptEntryError(str(error)) from None
    return snapshot, sealed


def _client(value: Any) -> tuple[str, int]:
    if not (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        raise ValueError("the client's address is not [host, port]")
    return value[0], value[1]


def _pack(items: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(items, use_bin_type=True)
    return packed


def _unpack(data: bytes, lengths: Mapping[int, int]) -> list[Any]:
    """The list packed in `data`: its first item a format version in `lengths`.

    `lengths` maps each version read to its number of items.
    """
    try:
        items = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise CorruptEntryError(f"not msgpack: {error}") from None
    if not (
        isinstance(items, list)
        and items
        and type(items[0]) is int  # hashable, and not a bool standing for 1
        and lengths.get(items[0]) == len(items)
    ):
        raise CorruptEntryError("not a value of this format version")
    return items
