"""A stored answer's two representations: gzip, and the bytes it decodes to.

At store time the worker gzips a compressible answer once (`for_storing`); at hit time
each request gets the representation its `Accept-Encoding` asks for (`select`): the
stored gzip as it is, or decoded. An answer the app gzipped itself is marked at store
time too, so that a client that accepts no gzip never gets gzip (see
docs/compression.md).
"""

from __future__ import annotations

import dataclasses

from asgi_worker.core.codec import Coded, CorruptEntryError, StoredResponse
from asgi_worker.core.encodings import (
    GZIP,
    WORTH_IT,
    app_gzip,
    compressible,
    framed,
    gunzip,
    gzip,
    tagged,
    with_vary,
)
from asgi_worker.core.keys import Headers

IDENTITY = "identity"


def for_storing(
    response: StoredResponse, *, min_bytes: int, limit: int, level: int
) -> StoredResponse:
    """`response` as the cache stores it: gzipped once (at zlib's `level`) if worth it.

    Gzipped: a whole body (not one stored apart) larger than `min_bytes`, of a
    compressible type with no coding of its own (`encodings.compressible`), in a
    response with a body that is not a part (no 206), if gzip makes it smaller than
    `WORTH_IT` of its size. An answer the app gzipped itself (decoding to at most
    `limit` bytes) is kept as it is, and marked so that it can be served decoded.
    Either gets `Vary: Accept-Encoding`. Anything else is returned as it is.
    """
    body = response.body
    if (
        response.apart is not None
        or response.hit_for_pass
        or response.coded is not None
        or not body
        or response.status in (206, 304)
    ):
        return response
    if app_gzip(response.headers):
        try:
            decoded = gunzip(body, limit)
        except ValueError:
            return response  # not gzip as it claims: served as the app sent it
        coded = Coded(GZIP, len(decoded), by_cache=False)
        return dataclasses.replace(response, headers=with_vary(response.headers), coded=coded)
    if len(body) <= min_bytes or not compressible(response.headers):
        return response
    packed = gzip(body, level)
    if len(packed) >= WORTH_IT * len(body):
        return response
    return dataclasses.replace(
        response,
        headers=with_vary(response.headers),
        body=packed,
        coded=Coded(GZIP, len(body), by_cache=True),
    )


def select(
    response: StoredResponse, accepts_gzip: bool, decoded: bytes | None = None
) -> StoredResponse:
    """The representation of `response` to send a client that does (not) accept gzip.

    A response with no `coded` body is returned as it is. Otherwise the result has none
    either (it is what is sent): the gzip as stored, with `Content-Encoding: gzip`, its
    own `Content-Length` and ETag; or the decoded bytes, with the app's headers for them.
    The ETag of the representation the app did not send is the app's with a suffix
    (`encodings.tagged`). `CorruptEntryError` if the stored gzip is not what the entry
    says: its frame is checked for every client (`encodings.framed`), its content for
    those that get it decoded. `decoded`: the body decoded already, from an earlier
    hit of this very entry (`content_key`), to send instead of decoding it again.
    """
    coded = response.coded
    if coded is None:
        return response
    if not framed(response.body, coded.identity_length):
        raise CorruptEntryError("stored gzip is not one whole member of the recorded length")
    if coded.by_cache:
        if accepts_gzip:
            headers = _recoded(response.headers, len(response.body), GZIP)
            return dataclasses.replace(response, headers=headers, coded=None)
        body = decoded if decoded is not None else _decoded(response, coded)
        return dataclasses.replace(response, body=body, coded=None)
    if accepts_gzip:
        return dataclasses.replace(response, coded=None)
    headers = _recoded(response.headers, coded.identity_length, IDENTITY)
    body = decoded if decoded is not None else _decoded(response, coded)
    return dataclasses.replace(response, headers=headers, body=body, coded=None)


def _recoded(headers: Headers, length: int, coding: str) -> Headers:
    """The headers of another representation of the body: its `Content-Length` and tag.

    To gzip, `Content-Encoding: gzip` is added; to identity, the app's is dropped.
    """
    changed: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name == b"content-length":
            changed.append((name, b"%d" % length))
        elif name == b"etag":
            changed.append((name, tagged(value, coding)))
        elif name != b"content-encoding":
            changed.append((name, value))
    if coding != IDENTITY:
        changed.append((b"content-encoding", coding.encode()))
    return tuple(changed)


def _decoded(response: StoredResponse, coded: Coded) -> bytes:
    """The stored gzip decoded; `CorruptEntryError` unless it is what the entry says."""
    try:
        body = gunzip(response.body, coded.identity_length)
    except ValueError as error:
        raise CorruptEntryError(f"stored gzip: {error}") from None
    if len(body) != coded.identity_length:
        raise CorruptEntryError("stored gzip decodes to another length than recorded")
    return body


def content_key(response: StoredResponse) -> bytes:
    """What tells a gzip entry's content apart from another's of the same URL.

    Its ETag (the app's, or the hash of the body the worker made) and gzip's trailer (the
    decoded bytes' CRC-32 and size): for keeping a decoded body between hits of one
    entry, never giving it for another.
    """
    etag = next((value for name, value in response.headers if name == b"etag"), b"")
    return etag + b"/" + response.body[-8:]
