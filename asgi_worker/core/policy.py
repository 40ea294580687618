"""Which requests go through the worker, and which go straight to the app."""

from __future__ import annotations

import fnmatch
import re

from starlette.types import Scope

from asgi_worker.core.config import Config
from asgi_worker.core.credentials import CREDENTIAL_HEADERS
from asgi_worker.core.replay import REPLAY_EXTENSION

_CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
# A shared cache must not serve what was asked with credentials (RFC 9111 section 3.5).
_CREDENTIAL_HEADERS = frozenset(CREDENTIAL_HEADERS)
# A client that asks for an event stream (an `EventSource`) wants a live stream, which is
# the app's to serve: it never waits on a 202 (docs/stored-response.md).
_EVENT_STREAM = b"text/event-stream"


class Policy:
    """Decides per request: through the worker, or straight to the app."""

    def __init__(self, config: Config) -> None:
        self._include = _compile(config.include)
        self._exclude = _compile(config.exclude)
        # The default (every path, none excluded) needs no pattern matching at all.
        self._every_path = "*" in config.include and not config.exclude
        # With key_credentials those requests get entries of their own instead. A request
        # with a body is not keyed by it: it goes to the app, body and all.
        credentials = frozenset() if config.key_credentials else _CREDENTIAL_HEADERS
        self._bypassed = credentials | {b"transfer-encoding"}

    def handles(self, scope: Scope) -> bool:
        """True if the request is served from the cache / worker."""
        if scope["type"] != "http" or scope.get("method") not in _CACHEABLE_METHODS:
            return False
        if REPLAY_EXTENSION in (scope.get("extensions") or {}):
            return False  # the worker's own replay: let it reach the app
        if not self._every_path:
            path = scope.get("path") or "/"
            if not self._include.match(path) or self._exclude.match(path):
                return False
        for name, value in scope.get("headers") or ():  # a loop: cheaper than any() per hit
            lowered = bytes(name).lower()
            if lowered in self._bypassed:
                return False
            if lowered == b"content-length" and bytes(value).strip() not in (b"0", b""):
                return False
            if lowered == b"accept" and _accepts_event_stream(bytes(value)):
                return False
        return True


def _accepts_event_stream(accept: bytes) -> bool:
    """`Accept` lists `text/event-stream` with a q-value other than 0 (RFC 9110 12.5.1)."""
    accept = accept.lower()
    if _EVENT_STREAM not in accept:  # the common case: one substring search
        return False
    for item in accept.split(b","):
        media_type, *parameters = item.split(b";")
        if media_type.strip() != _EVENT_STREAM:
            continue
        for parameter in parameters:
            name, _, weight = parameter.partition(b"=")
            if name.strip() == b"q" and weight.strip().rstrip(b"0").rstrip(b".") in (b"0", b""):
                return False
        return True
    return False


def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.DOTALL)
