"""Replay a request snapshot through an ASGI app and collect the complete response.

No Redis here: a scope is built field by field from the snapshot, the app is driven with
a synthetic `receive`/`send` pair, and the response messages are checked against the
ASGI HTTP state machine (start, then body chunks until `more_body` is false).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Scope

from .keys import Headers, RequestSnapshot

REPLAY_EXTENSION = "asgi_worker.replay"
"""Key in `scope["extensions"]` that marks a replayed request (the middleware passes it on)."""

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ReplayError(Exception):
    """The app did not produce a response that can be stored."""


class InvalidResponseError(ReplayError):
    """The app sent messages out of the ASGI order, or of the wrong shape."""


class BodyTooLargeError(ReplayError):
    """The response body grew past `max_body_bytes`."""


@dataclass(frozen=True, slots=True)
class ReplayedResponse:
    """What the app sent: status, headers and the whole body."""

    status: int
    headers: Headers
    body: bytes


def build_scope(snapshot: RequestSnapshot, state: Mapping[str, Any] | None) -> Scope:
    """An HTTP scope holding the snapshot and nothing else (no client, no other header)."""
    headers = [(b"host", snapshot.host.encode("latin-1"))] if snapshot.host else []
    headers.extend(snapshot.headers)
    headers.extend(snapshot.credentials)
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": snapshot.scheme,
        "path": snapshot.path,
        "raw_path": snapshot.raw_path,
        "root_path": snapshot.root_path,
        "query_string": snapshot.query_string,
        "headers": headers,
        "client": None,
        "server": _server(snapshot.host, snapshot.scheme),
        "extensions": {REPLAY_EXTENSION: {}},
    }
    if state is not None:
        # A shallow copy per request, as servers do: request-level writes stay local.
        scope["state"] = dict(state)
    return scope


async def replay(
    app: ASGIApp,
    snapshot: RequestSnapshot,
    *,
    max_body_bytes: int,
    state: Mapping[str, Any] | None = None,
) -> ReplayedResponse:
    """Run `app` on the snapshot; raise `ReplayError` if it gives no storable response.

    Exceptions the app raises propagate, except that a `ReplayError` found while
    collecting wins (the app may have wrapped it, e.g. in an `ExceptionGroup`).
    """
    collector = _Collector(max_body_bytes)
    try:
        await app(build_scope(snapshot, state), collector.receive, collector.send)
    except Exception:
        if collector.failure is not None:
            raise collector.failure from None
        raise
    return collector.result()


class _Phase(enum.Enum):
    START = "waiting for http.response.start"
    BODY = "waiting for http.response.body"
    DONE = "response complete"


class _Collector:
    """The synthetic `receive`/`send` pair, as a small state machine."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body_bytes = max_body_bytes
        self._phase = _Phase.START
        self._request_sent = False
        self._done = asyncio.Event()
        self._status = 0
        self._headers: Headers = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self.failure: ReplayError | None = None

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Like a client that waits for its answer, then goes away.
        await self._done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            self._advance(message)
        except ReplayError as error:
            self.failure = error
            self._done.set()
            raise

    def _advance(self, message: Message) -> None:
        kind = message.get("type")
        if self._phase is _Phase.START and kind == "http.response.start":
            self._status = _status(message.get("status"))
            self._headers = _headers(message.get("headers", ()))
            self._phase = _Phase.BODY
        elif self._phase is _Phase.BODY and kind == "http.response.body":
            body = message.get("body", b"")
            if not isinstance(body, bytes | bytearray | memoryview):
                raise InvalidResponseError(f"body must be bytes, got {type(body).__name__}")
            self._size += len(body)
            if self._size > self._max_body_bytes:
                raise BodyTooLargeError(f"body exceeds max_body_bytes={self._max_body_bytes}")
            self._chunks.append(bytes(body))
            if not message.get("more_body", False):
                self._phase = _Phase.DONE
                self._done.set()
        else:
            raise InvalidResponseError(f"unexpected {kind!r} message: {self._phase.value}")

    def result(self) -> ReplayedResponse:
        if self.failure is not None:
            raise self.failure
        if self._phase is not _Phase.DONE:
            raise InvalidResponseError(f"app returned early: {self._phase.value}")
        return ReplayedResponse(self._status, self._headers, b"".join(self._chunks))


def _status(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    raise InvalidResponseError(f"status must be an int from 100 to 599, got {value!r}")


def _headers(value: Any) -> Headers:
    """Checked, with names lowercased, in one pass (it runs once per replay)."""
    headers: list[tuple[bytes, bytes]] = []
    try:
        for name, raw in value:
            if not (isinstance(name, bytes | bytearray) and isinstance(raw, bytes | bytearray)):
                raise TypeError
            headers.append((bytes(name).lower(), bytes(raw)))
    except (TypeError, ValueError):  # not iterable, not pairs, or not bytes
        raise InvalidResponseError("headers must be an iterable of (bytes, bytes) pairs") from None
    return tuple(headers)


def _server(host: str, scheme: str) -> tuple[str, int | None] | None:
    """`server` from the Host header, as a server behind that name would see it."""
    if not host:
        return None
    name, _, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
    if name and port.isdigit() and len(port) <= 5:
        return name.strip("[]"), int(port)
    return host.strip("[]"), _DEFAULT_PORTS.get(scheme)
