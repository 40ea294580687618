"""freshness.py: lifetimes from Cache-Control and config, ETags, If-None-Match."""

from __future__ import annotations

import pytest

from asgi_worker import Config
from asgi_worker.core.freshness import Lifetime, cache_control, entity_tag, lifetime, none_match

CONFIG = Config(
    ttl=300, error_ttl=10, stale_ttl=5, min_ttl=1, pass_ttl=60, ttl_rules=(("/r/*", 30),)
)


def life(
    cache: str | None = None, *, status: int = 200, path: str = "/x", cookie: bool = False
) -> Lifetime:
    headers: list[tuple[bytes, bytes]] = []
    if cache is not None:
        headers.append((b"cache-control", cache.encode()))
    if cookie:
        headers.append((b"set-cookie", b"session=1"))
    return lifetime(status, tuple(headers), path, CONFIG)


@pytest.mark.parametrize(
    ("cache", "path", "expected"),
    [
        (None, "/x", Lifetime(True, 300, 5)),
        (None, "/r/1", Lifetime(True, 30, 5)),  # the route rule
        ("max-age=120", "/r/1", Lifetime(True, 120, 5)),  # the app wins over the rule
        ("max-age=120, s-maxage=20", "/x", Lifetime(True, 20, 5)),  # shared cache: s-maxage
        ("S-MaxAge=20", "/x", Lifetime(True, 20, 5)),  # names are case-insensitive
        ('max-age="45"', "/x", Lifetime(True, 45, 5)),  # quoted arguments
        ("max-age=0", "/x", Lifetime(True, 1, 5)),  # floored by min_ttl
        ("max-age=abc", "/x", Lifetime(True, 1, 5)),  # invalid means stale (RFC 9111 4.2.1)
        ("no-cache", "/x", Lifetime(True, 1, 5)),
        ("max-age=60, stale-while-revalidate=30", "/x", Lifetime(True, 60, 30)),
        ("max-age=60, stale-if-error=90, stale-while-revalidate=30", "/x", Lifetime(True, 60, 90)),
        ("public, max-age=60", "/x", Lifetime(True, 60, 5)),
        ("private, max-age=60", "/x", Lifetime(False, 60, 0)),
        ("no-store", "/x", Lifetime(False, 60, 0)),
    ],
)
def test_lifetime(cache: str | None, path: str, expected: Lifetime) -> None:
    assert life(cache, path=path) == expected


def test_set_cookie_makes_a_response_private() -> None:
    assert life("max-age=600", cookie=True) == Lifetime(False, 60, 0)


def test_server_errors_live_for_error_ttl_only() -> None:
    assert life("max-age=600", status=503) == Lifetime(True, 10, 0)


def test_several_cache_control_headers_are_combined() -> None:
    headers = ((b"cache-control", b"max-age=5"), (b"cache-control", b"private"))
    assert cache_control(headers) == {"max-age": "5", "private": None}


def test_entity_tag_keeps_the_apps_own_and_makes_a_strong_one_otherwise() -> None:
    assert entity_tag(((b"etag", b'W/"v1"'),), b"body") == b'W/"v1"'
    made = entity_tag((), b"body")
    assert made[:1] == made[-1:] == b'"'
    assert len(made) == 26
    assert made == entity_tag((), b"body")
    assert made != entity_tag((), b"other body")


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (b'"a"', True),
        (b'W/"a"', True),
        (b'"b", "a"', True),
        (b"*", True),
        (b'"b"', False),
        (b"", False),
    ],
)
def test_none_match_uses_weak_comparison(header: bytes, matches: bool) -> None:
    assert none_match(header, b'"a"') is matches
