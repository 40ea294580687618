"""Content codings: which answers are worth compressing, gzip both ways, `Accept-Encoding`.

Pure functions over bytes and headers. The cache stores a compressible answer gzipped
once (`representations.compressed`) and serves it per request as gzip or decoded
(`representations.select`); this module holds the rules both steps use.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from asgi_worker.core.keys import Headers

GZIP = "gzip"
"""The one coding the cache stores and decodes (RFC 9110 section 8.4.1.3)."""

WORTH_IT = 0.9
"""A compressed body is kept only if it is smaller than this share of the original."""

_GZIP_WBITS = 31  # zlib's window of 2**15 with a gzip header and trailer

# Types whose bodies are text, or text-like, and compress well. Images other than SVG,
# audio, video, archives and fonts are compressed already.
_COMPRESSIBLE_TYPES = frozenset(
    {
        b"application/ecmascript",
        b"application/graphql-response+json",
        b"application/javascript",
        b"application/json",
        b"application/ld+json",
        b"application/manifest+json",
        b"application/rss+xml",
        b"application/wasm",
        b"application/x-javascript",
        b"application/x-ndjson",
        b"application/xhtml+xml",
        b"application/xml",
        b"image/svg+xml",
        b"image/x-icon",
    }
)
_COMPRESSIBLE_SUFFIXES = (b"+json", b"+xml")
_GZIP_NAMES = frozenset({b"gzip", b"x-gzip"})  # x-gzip: RFC 9110 section 8.4.1.3


def compressible(headers: Headers) -> bool:
    """Whether an answer with `headers` may be stored gzipped by the cache.

    Its type is text-like (`text/*`, JSON, XML, JavaScript, SVG, ...), it has no coding
    of its own, it is not a part of something (`Content-Range`), and the app did not ask
    intermediaries to leave it as it is (`Cache-Control: no-transform`, RFC 9111
    section 5.2.2.6).
    """
    content_type = None
    for name, value in headers:
        if name in (b"content-encoding", b"content-range"):
            return False
        if name == b"cache-control" and b"no-transform" in value.lower():
            return False
        if name == b"content-type":
            content_type = value
    return content_type is not None and compressible_type(content_type)


def compressible_type(content_type: bytes) -> bool:
    """Whether a `Content-Type` (parameters and case aside) names a text-like type."""
    media = content_type.partition(b";")[0].strip().lower()
    return (
        media.startswith(b"text/")
        or media in _COMPRESSIBLE_TYPES
        or media.endswith(_COMPRESSIBLE_SUFFIXES)
    )


def app_gzip(headers: Headers) -> bool:
    """Whether the app coded its answer with gzip alone (`Content-Encoding: gzip`)."""
    codings = [
        coding.strip().lower()
        for name, value in headers
        if name == b"content-encoding"
        for coding in value.split(b",")
        if coding.strip()
    ]
    return len(codings) == 1 and codings[0] in _GZIP_NAMES


def gzip(body: bytes, level: int) -> bytes:
    """`body` gzipped, with no file name and a zero time, so equal bodies code equally."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
    return compressor.compress(body) + compressor.flush()


def gunzip(data: bytes, limit: int) -> bytes:
    """The bytes one gzip member `data` codes; `ValueError` if it is anything else.

    Anything else: not gzip, cut short, with bytes after its end (several members are
    refused: the cache never writes them), or decoding to more than `limit` bytes (what
    the cache could have stored, so a small body that inflates hugely costs no memory).
    """
    decompressor = zlib.decompressobj(_GZIP_WBITS)
    try:
        decoded = decompressor.decompress(data, limit + 1)
    except zlib.error as error:
        raise ValueError(f"not gzip: {error}") from None
    if len(decoded) > limit:
        raise ValueError(f"gzip decodes to more than {limit} bytes")
    if not decompressor.eof or decompressor.unused_data or decompressor.unconsumed_tail:
        raise ValueError("gzip cut short, or bytes after its end")
    return decoded


def framed(data: bytes, length: int) -> bool:
    """Whether `data` looks like one whole gzip member of `length` bytes decoded.

    Its magic at the start, and at the end the decoded size gzip's trailer holds (modulo
    2**32, RFC 1952): a check that costs nothing per hit, where decoding costs a pass
    over the body. Truncated or foreign bytes fail it; a body with bytes changed inside
    fails only the full check of `gunzip` (the CRC).
    """
    return (
        len(data) >= 18
        and data.startswith(b"\x1f\x8b\x08")
        and int.from_bytes(data[-4:], "little") == length % 2**32
    )


def accepts_gzip(accept_encoding: Iterable[bytes]) -> bool:
    """Whether a request's `Accept-Encoding` values (each header's) accept gzip.

    RFC 9110 section 12.5.3: `gzip` (or `x-gzip`) with a q-value above 0, or else `*`
    with one; an explicit `gzip;q=0` refuses it whatever `*` says. A request with no
    `Accept-Encoding` is taken to accept only identity, as Varnish, nginx and Apache take
    it (the RFC lets such a client have any coding, but a client that sends none rarely
    decodes one: curl without `--compressed`, a script). An empty value accepts identity
    only (RFC). A q-value that is not a number ignores its entry.
    """
    named: float | None = None
    anything: float | None = None
    for value in accept_encoding:
        for entry in value.split(b","):
            coding, _, parameters = entry.partition(b";")
            coding = coding.strip().lower()
            if not coding:
                continue
            quality = _quality(parameters)
            if quality is None:
                continue
            if coding in _GZIP_NAMES:
                named = quality if named is None else max(named, quality)
            elif coding == b"*":
                anything = quality if anything is None else max(anything, quality)
    if named is not None:
        return named > 0
    return anything is not None and anything > 0


def _quality(parameters: bytes) -> float | None:
    """The q-value of one entry's parameters (1 if none); None if it is not a number."""
    for parameter in parameters.split(b";"):
        name, equals, value = parameter.partition(b"=")
        if equals and name.strip().lower() == b"q":
            try:
                quality = float(value.strip())
            except ValueError:
                return None
            return quality if 0 <= quality <= 1 else None
    return 1.0


def tagged(etag: bytes, coding: str) -> bytes:
    """The ETag of another representation: `"abc"` -> `"abc-gzip"`, `W/"abc"` likewise.

    Each representation needs a tag of its own (RFC 9110 section 8.8.3: a strong tag is
    byte-for-byte), and a client's `If-None-Match` then names the one it holds. The
    suffix goes inside the quotes, as Apache's mod_deflate puts it.
    """
    suffix = b"-" + coding.encode()
    if etag.endswith(b'"') and len(etag) >= 2:
        return etag[:-1] + suffix + b'"'
    return etag + suffix


def with_vary(headers: Headers, token: bytes = b"Accept-Encoding") -> Headers:
    """`headers` with `token` in their `Vary` (added to the app's, or a new `Vary`)."""
    wanted = token.lower()
    for name, value in headers:
        if name == b"vary" and any(
            part.strip().lower() in (wanted, b"*") for part in value.split(b",")
        ):
            return headers
    for index, (name, value) in enumerate(headers):
        if name == b"vary":
            joined = value + b", " + token if value.strip() else token
            return (*headers[:index], (b"vary", joined), *headers[index + 1 :])
    return (*headers, (b"vary", token))
