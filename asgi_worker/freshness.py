"""How long a response is fresh, how long it may be served stale, and whether it is shared.

Pure functions over the app's response headers and `Config`, following a shared cache's
rules (RFC 9111): `s-maxage` wins over `max-age`; `private`, `no-store` and `Set-Cookie`
make a response unfit to share (the key becomes hit-for-pass, as in Varnish); RFC 5861's
`stale-while-revalidate` and `stale-if-error` set the stale window.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .config import Config
from .keys import Headers

_DIRECTIVE = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*(\"[^\"]*\"|[^,\s]*))?\s*")
_NOT_SHARED = frozenset({"private", "no-store"})


@dataclass(frozen=True, slots=True)
class Lifetime:
    """What to do with one response."""

    shared: bool
    """False: never serve it to another client (store a hit-for-pass marker instead)."""
    fresh: float
    """Seconds it is served as fresh."""
    stale: float
    """Seconds after that it is still served while one refresh runs (or the refresh fails)."""


def shareable(headers: Headers) -> bool:
    """False for a response no other client may get.

    That is one marked `private` or `no-store`, one that sets a cookie, or one with
    `Vary: *` (RFC 9111 sections 3.5 and 4.1).
    """
    if _NOT_SHARED & cache_control(headers).keys():
        return False
    return not any(
        name == b"set-cookie" or (name == b"vary" and _varies_on_anything(value))
        for name, value in headers
    )


def lifetime(status: int, headers: Headers, path: str, config: Config) -> Lifetime:
    """Decide freshness for a response of the app (not for our own error responses)."""
    directives = cache_control(headers)
    if not shareable(headers):
        return Lifetime(shared=False, fresh=config.pass_ttl, stale=0.0)
    if status >= 500:
        return Lifetime(shared=True, fresh=config.error_ttl, stale=0.0)
    if "no-cache" in directives:
        asked: float | None = 0.0  # must revalidate: here, refreshed after min_ttl
    elif "s-maxage" in directives:
        asked = _seconds(directives["s-maxage"])
    elif "max-age" in directives:
        asked = _seconds(directives["max-age"])
    else:
        asked = None
    # The client that got the 202 polls for this response: keep it at least min_ttl.
    fresh = route_ttl(path, config) if asked is None else max(asked, config.min_ttl)
    window = [
        _seconds(directives[name])
        for name in ("stale-while-revalidate", "stale-if-error")
        if name in directives
    ]
    stale = max(window, default=config.stale_ttl)
    return Lifetime(shared=True, fresh=fresh, stale=stale)


def _varies_on_anything(vary: bytes) -> bool:
    """`Vary: *`: no later request matches it (RFC 9111 section 4.1), so never share it."""
    return any(part.strip() == b"*" for part in vary.split(b","))


def route_ttl(path: str, config: Config) -> float:
    """The ttl of the first `ttl_rules` pattern matching `path`, else `Config.ttl`."""
    for pattern, ttl in config.ttl_rules:
        if fnmatch.fnmatchcase(path, pattern):
            return ttl
    return config.ttl


def cache_control(headers: Headers) -> dict[str, str | None]:
    """The Cache-Control directives of all Cache-Control headers, names lowercased."""
    found: dict[str, str | None] = {}
    for name, value in headers:
        if name != b"cache-control":
            continue
        for part in value.decode("latin-1").split(","):
            match = _DIRECTIVE.fullmatch(part)
            if match:
                argument = match.group(2)
                found.setdefault(
                    match.group(1).lower(), argument.strip('"') if argument is not None else None
                )
    return found


def _seconds(value: str | None) -> float:
    if value is None or not value.isdigit():
        return 0.0  # RFC 9111 section 4.2.1: an invalid freshness lifetime means stale
    return float(min(int(value), 2**31))


def entity_tag(headers: Headers, body: bytes | Iterable[bytes]) -> bytes:
    """The app's own ETag, or a strong one made from the body (computed once, at store).

    `body` may be given in the chunks the app sent: the tag is the same as for them
    joined, and a large body is never joined for it.
    """
    for name, value in headers:
        if name == b"etag":
            return value
    hashed = hashlib.blake2b(digest_size=12)
    for chunk in (body,) if isinstance(body, bytes) else body:
        hashed.update(chunk)
    return b'"' + hashed.hexdigest().encode() + b'"'


def none_match(if_none_match: bytes, etag: bytes) -> bool:
    """True if `If-None-Match` matches `etag` (weak comparison, RFC 9110 section 13.1.2)."""
    wanted = if_none_match.strip()
    if wanted == b"*":
        return True
    plain = etag.removeprefix(b"W/")
    return any(tag.strip().removeprefix(b"W/") == plain for tag in wanted.split(b","))
