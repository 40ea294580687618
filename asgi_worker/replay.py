"""Replay a request snapshot through an ASGI app and collect the complete response.

No Redis here: a scope is built field by field from the snapshot, the app is driven with
a synthetic `receive`/`send` pair, and the response messages are checked against the
ASGI HTTP state machine (start, then body chunks until `more_body` is false).

A replay enters at the top of the app, as the server would, so every layer outside
`WorkerMiddleware` adds to the scope what it always adds (the framework's `app`, a
`Mount`'s root path). The scope carries a `ReplayMarker`; the middleware that finds it
runs its own inner app and sends that answer to the marker's `capture`: the stored
response is what the app *inside* the middleware answers. The outer layers' copy of it
is dropped, since they run again when the hit is served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Scope, Send

from .keys import DEFAULT_PORTS, Headers, RequestSnapshot

REPLAY_EXTENSION = "asgi_worker.replay"
"""Key in `scope["extensions"]` of a replayed request; its value is a `ReplayMarker`."""


class ReplayError(Exception):
    """The app did not produce a response that can be stored."""


class InvalidResponseError(ReplayError):
    """The app sent messages out of the ASGI order, or of the wrong shape."""


class BodyTooLargeError(ReplayError):
    """The response body grew past `max_body_bytes`."""


@dataclass(slots=True)
class ReplayMarker:
    """Marks a replayed request; the `WorkerMiddleware` it is for answers through it."""

    prefix: str | None
    """The `Config.prefix` of the middleware that answers; None: the first one reached."""
    capture: Send
    reached: bool = field(default=False)
    """Set once a middleware took the replay: outer layers' messages are then ignored."""

    def take(self, prefix: str) -> bool:
        """True once, for the first middleware of the marker's prefix to see the replay."""
        if self.reached or self.prefix not in (None, prefix):
            return False
        self.reached = True
        return True

    def tee(self, send: Send) -> Send:
        """A `send` that captures each message, then passes it on to the outer layers."""
        capture = self.capture

        async def capture_then_send(message: Message) -> None:
            await capture(message)
            await send(message)

        return capture_then_send


def replay_marker(scope: Scope) -> ReplayMarker | None:
    """The scope's `ReplayMarker`, or None."""
    marker = (scope.get("extensions") or {}).get(REPLAY_EXTENSION)
    return marker if isinstance(marker, ReplayMarker) else None


@dataclass(frozen=True, slots=True)
class ReplayedResponse:
    """What the app sent: status, headers and the whole body."""

    status: int
    headers: Headers
    body: bytes
    leaving: Headers | None = None
    """The headers of the same answer as it left the top of the app, after the layers
    outside the middleware (None: no middleware took the replay, `headers` are those).
    A layer outside may react to what the app did (a session written: `Set-Cookie`)."""


def build_scope(
    snapshot: RequestSnapshot,
    state: Mapping[str, Any] | None,
    marker: ReplayMarker | None = None,
    *,
    mounted: bool = False,
) -> Scope:
    """An HTTP scope holding the snapshot and nothing else (no client, no other header).

    The scope is the server's: it enters at the top of the app, so its root path is the
    server's (`snapshot.entry_root_path`). `mounted` is for entering a sub-app instead,
    below the `Mount` that leads to the middleware: the root path is then the mount's,
    and the server's is in `app_root_path`, as Starlette's `Mount` leaves them.
    """
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
        "root_path": snapshot.root_path if mounted else snapshot.entry_root_path,
        "query_string": snapshot.query_string,
        "headers": headers,
        "client": None,
        "server": _server(snapshot.host, snapshot.scheme),
        "extensions": {REPLAY_EXTENSION: marker},
    }
    if mounted and snapshot.server_root_path is not None:
        scope["app_root_path"] = snapshot.server_root_path
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
    prefix: str | None = None,
    mounted: bool = False,
) -> ReplayedResponse:
    """Run `app` on the snapshot; raise `ReplayError` if it gives no storable response.

    The answer is the one the `WorkerMiddleware` of `prefix` (None: the first one) in
    `app` captured from its inner app; if no such middleware is reached (an outer layer
    answered itself, or `app` has none), it is what `app` sent.

    Exceptions the app raises propagate, except that a `ReplayError` found while
    collecting wins (the app may have wrapped it, e.g. in an `ExceptionGroup`).
    """
    exchange = _Exchange(max_body_bytes, prefix)
    scope = build_scope(snapshot, state, exchange.marker, mounted=mounted)
    try:
        await app(scope, exchange.receive, exchange.send)
    except Exception:
        if exchange.answer.failure is not None:
            raise exchange.answer.failure from None
        raise
    answer = exchange.answer.result()
    if exchange.marker.reached:
        return dataclasses.replace(answer, leaving=exchange.leaving)
    return answer


class _Exchange:
    """The synthetic `receive`/`send` pair, and where the answer is collected."""

    def __init__(self, max_body_bytes: int, prefix: str | None) -> None:
        self._request_sent = False
        self._done = asyncio.Event()
        self._inner = _Collector(max_body_bytes, self._done)
        self._outer = _Collector(max_body_bytes, self._done)
        self.marker = ReplayMarker(prefix, self._inner.send)
        self.leaving: Headers = ()
        """The headers the outer layers sent on, once a middleware took the replay."""

    @property
    def answer(self) -> _Collector:
        """The middleware's capture if one took the replay, else what the app sent."""
        return self._inner if self.marker.reached else self._outer

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Like a client that waits for its answer, then goes away.
        await self._done.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if not self.marker.reached:
            await self._outer.send(message)
        elif message.get("type") == "http.response.start":
            # The outer layers' copy of the captured answer: not stored, but a layer that
            # made it private (a session cookie) makes the answer private too.
            try:
                self.leaving = _headers(message.get("headers", ()))
            except InvalidResponseError:
                self.leaving = ()


class _Phase(enum.Enum):
    START = "waiting for http.response.start"
    BODY = "waiting for http.response.body"
    DONE = "response complete"


class _Collector:
    """One response's messages, checked as a small state machine; sets `done` at its end."""

    def __init__(self, max_body_bytes: int, done: asyncio.Event) -> None:
        self._max_body_bytes = max_body_bytes
        self._phase = _Phase.START
        self._done = done
        self._status = 0
        self._headers: Headers = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self.failure: ReplayError | None = None

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
    """`server` from the keyed Host (normalised: `name` or `name:port`, see keys.py)."""
    if not host:
        return None
    name, colon, port = host.rpartition(":")
    if colon and not port.endswith("]"):  # a port, not the last group of an IPv6 literal
        return name.strip("[]"), int(port)
    return host.strip("[]"), DEFAULT_PORTS.get(scheme)
