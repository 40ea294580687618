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

The app runs in a task of its own, watched rather than awaited: the answer is final as
soon as its last body message is sent, whatever the app does after it (see `replay`),
and a live stream is recognised and stopped at once instead of being read to the end.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .keys import DEFAULT_PORTS, Headers, RequestSnapshot

logger = logging.getLogger("asgi_worker")

REPLAY_EXTENSION = "asgi_worker.replay"
"""Key in `scope["extensions"]` of a replayed request; its value is a `ReplayMarker`."""


class ReplayError(Exception):
    """The app did not produce a response that can be stored."""


class InvalidResponseError(ReplayError):
    """The app sent messages out of the ASGI order, or of the wrong shape."""


class BodyTooLargeError(ReplayError):
    """The response body, sent whole in one message, is larger than `max_body_bytes`."""


class LiveStreamError(ReplayError):
    """The answer is a live stream: it is the app's to serve, never stored.

    An event stream (`Content-Type: text/event-stream`) is one from its first message;
    any other answer is one if its body is still streaming when the replay's time or
    `max_body_bytes` runs out (an endless feed, a stream larger than the cache takes).
    """


class ReplayTimeoutError(ReplayError):
    """The app began no answer within the replay's time limit."""


class LeftRunningError(Exception):
    """The app's work after its answer was still running at the time limit: cancelled."""


_EVENT_STREAM = b"text/event-stream"

# How long a replay waits for an app it stopped (a live stream, its time run out) to
# unwind after its cancellation; an app that ignores it is left running, and logged.
_STOP_GRACE = 1.0


@dataclass(slots=True)
class ReplayMarker:
    """Marks a replayed request; the `WorkerMiddleware` it is for answers through it."""

    prefix: str | None
    """The `Config.prefix` of the middleware that answers; None: the first one reached."""
    capture: Send
    reached: bool = field(default=False)
    """Set once a middleware took the replay: outer layers' messages are then ignored."""
    raised: Exception | None = field(default=None)
    """What the app inside the middleware raised, if it did (see `answer`)."""

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

    async def answer(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the middleware's inner `app`, capturing its answer (see `tee`).

        If it raises before it began an answer, the exception goes on to the outer
        layers, and what they answer for it (an error handler's page, a middleware that
        maps the exception to a status) is the answer, as for a request from the server.
        """
        try:
            await app(scope, receive, self.tee(send))
        except Exception as error:
            self.raised = error
            raise


def replay_marker(scope: Scope) -> ReplayMarker | None:
    """The scope's `ReplayMarker`, or None."""
    marker = (scope.get("extensions") or {}).get(REPLAY_EXTENSION)
    return marker if isinstance(marker, ReplayMarker) else None


@dataclass(frozen=True, slots=True)
class ReplayedResponse:
    """What the app sent: status, headers and the whole body."""

    status: int
    headers: Headers
    chunks: tuple[bytes, ...]
    """The body, in the chunks the app sent it (empty ones left out): never joined on the
    way to the store, so that a large body is held once, not copied whole."""
    leaving: Headers | None = None
    """The headers of the same answer as it left the top of the app, after the layers
    outside the middleware (None: no middleware took the replay, `headers` are those).
    A layer outside may react to what the app did (a session written: `Set-Cookie`)."""
    rest: asyncio.Future[None] | None = field(default=None, compare=False, repr=False)
    """The app's run, which may go on after its answer (see `replay` and `finish`)."""
    handled: Exception | None = field(default=None, compare=False, repr=False)
    """What the app inside the middleware raised, where a layer outside answered for it:
    this answer is that layer's."""

    @property
    def body(self) -> bytes:
        """The body joined (a copy, unless it came in one chunk): for small bodies."""
        return b"".join(self.chunks)

    @property
    def length(self) -> int:
        """The body's size in bytes."""
        return sum(map(len, self.chunks))


def build_scope(
    snapshot: RequestSnapshot,
    state: Mapping[str, Any] | None,
    marker: ReplayMarker | None = None,
    *,
    mounted: bool = False,
) -> Scope:
    """An HTTP scope holding the snapshot and nothing else (no other header).

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
        "client": snapshot.client,
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
    time_limit: float | None = None,
    state: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    mounted: bool = False,
) -> ReplayedResponse:
    """Run `app` on the snapshot; raise `ReplayError` if it gives no storable response.

    The answer is the one the `WorkerMiddleware` of `prefix` (None: the first one) in
    `app` captured from its inner app; if no such middleware is reached (an outer layer
    answered itself, or `app` has none), it is what `app` sent.

    The answer is final once its last body message is sent, and returned then: what the
    app does after it (a background task, code after the last `send`) cannot change it.
    That work goes on in `ReplayedResponse.rest`, for the caller to see end (`finish`).

    Raises `LiveStreamError` for an event stream (stopped at its first message) and for a
    body still streaming when `time_limit` (seconds) runs out or it grows past
    `max_body_bytes`; `ReplayTimeoutError` if no answer began within `time_limit`;
    `BodyTooLargeError` for a body sent whole and larger than `max_body_bytes`. The app is
    cancelled in each case. Other exceptions the app raises before its answer is complete
    propagate, except that a `ReplayError` found while collecting wins (the app may have
    wrapped it, e.g. in an `ExceptionGroup`).
    """
    exchange = _Exchange(max_body_bytes, prefix)
    scope = build_scope(snapshot, state, exchange.marker, mounted=mounted)
    running = _start(app(scope, exchange.receive, exchange.send))
    running.add_done_callback(exchange.app_ended)
    try:
        if not exchange.settled.done():  # an app that answered in its first step has
            async with asyncio.timeout(time_limit):
                await exchange.settled
    except TimeoutError:
        if not exchange.answer.complete:
            await stop(running)
            raise exchange.answer.timed_out() from None
        # Complete, though the outer layers never passed its end on: the answer stands.
    except BaseException:  # the job itself is cancelled: so is the app
        await stop(running)
        raise
    answer = exchange.answer
    if answer.failure is not None:
        await stop(running)
        raise answer.failure
    if not answer.complete:  # the app ended before its answer did
        error = None if running.cancelled() else running.exception()
        if error is not None:
            raise error
    if exchange.outer_answered:
        return answer.result(rest=running, handled=exchange.marker.raised)
    if exchange.marker.reached:
        return answer.result(rest=running, leaving=exchange.leaving)
    return answer.result(rest=running)


def _start(running: Awaitable[None]) -> asyncio.Future[None]:
    """The app's task, started eagerly from Python 3.12.

    An app that answers without waiting on anything has then answered when this returns:
    the replay takes no round of the event loop.
    """
    if _EAGER and asyncio.iscoroutine(running):
        loop = asyncio.get_running_loop()
        return asyncio.Task(running, loop=loop, eager_start=True)  # type: ignore[call-arg,unused-ignore]
    return asyncio.ensure_future(running)


_EAGER = sys.version_info >= (3, 12)


async def finish(rest: asyncio.Future[None], time_left: float | None) -> BaseException | None:
    """Let the app's work after its answer end, within `time_left` seconds.

    Returns the exception that work raised, `LeftRunningError` if it was still running
    when the time ran out (it is then cancelled, as a server cancels a request's leftover
    work at shutdown), or None. Called while the caller is being cancelled (a worker
    shutting down), it cancels that work at once.
    """
    if _cancelling():
        await stop(rest)
        return None
    try:
        async with asyncio.timeout(time_left):
            await asyncio.shield(rest)
    except TimeoutError:
        if rest.done():  # the app's own TimeoutError
            return rest.exception()
        await stop(rest)
        return LeftRunningError(f"still running after {time_left} s")
    except asyncio.CancelledError:
        if rest.cancelled() and not _cancelling():
            return None  # the app cancelled itself: nothing to report
        await stop(rest)
        raise
    except Exception as error:
        return error
    return None


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop(running: asyncio.Future[None]) -> None:
    """Cancel the app's task and give it `_STOP_GRACE` seconds to unwind.

    An app that ignores its cancellation is left running, and logged.
    """
    if not running.done():
        running.cancel()
        await asyncio.wait({running}, timeout=_STOP_GRACE)
        if not running.done():
            logger.error("asgi-worker: an app ignored its cancellation; it is left running")
            return
    if not running.cancelled():
        running.exception()  # retrieved: asyncio would log it as never retrieved


class _Exchange:
    """The synthetic `receive`/`send` pair, and where the answer is collected."""

    def __init__(self, max_body_bytes: int, prefix: str | None) -> None:
        self._request_sent = False
        self._app_ended = False
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the replay has its outcome: see `_settle`."""
        self._answered = False
        self._disconnect: asyncio.Event | None = None
        """Made only for an app that asks for more than its request (most never do)."""
        self._inner = _Collector(max_body_bytes, self._settle)
        self._outer = _Collector(max_body_bytes, self._settle)
        self.marker = ReplayMarker(prefix, self._inner.send)
        self.leaving: Headers = ()
        """The headers the outer layers sent on, once a middleware took the replay."""
        self._left = False

    @property
    def outer_answered(self) -> bool:
        """The answer is the outer layers': the inner app raised before it began one."""
        return self.marker.raised is not None and not self._inner.started

    @property
    def answer(self) -> _Collector:
        """The middleware's capture if one took the replay, else what the app sent.

        Where the middleware's inner app raised before it began an answer, what the
        outer layers sent for it.
        """
        if not self.marker.reached or self.outer_answered:
            return self._outer
        return self._inner

    def app_ended(self, _: object) -> None:
        """Done-callback of the app's task."""
        self._app_ended = True
        self._settle()

    def _settle(self) -> None:
        """Wake the replay once its outcome is known.

        That is when the answer failed, or it is complete (and, if a middleware captured
        it, has left the top of the app too, so `leaving` is known), or the app ended.
        """
        answer = self.answer
        if (answer.failure is not None or answer.complete) and not self._answered:
            self._answered = True
            if self._disconnect is not None:
                self._disconnect.set()
        left = self._left or answer is self._outer
        ended = self._app_ended or answer.failure is not None or (answer.complete and left)
        if ended and not self.settled.done():
            self.settled.set_result(None)

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # Like a client that waits for its answer, then goes away.
        if not self._answered:
            if self._disconnect is None:
                self._disconnect = asyncio.Event()
            await self._disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.answer is self._outer:
            await self._outer.send(message)
            return
        # The outer layers' copy of the captured answer: not stored, but a layer that
        # made it private (a session cookie) makes the answer private too.
        kind = message.get("type")
        if kind == "http.response.start":
            try:
                self.leaving = _headers(message.get("headers", ()))
            except InvalidResponseError:
                self.leaving = ()
        elif kind == "http.response.body" and not message.get("more_body", False):
            self._left = True
            self._settle()


class _Phase(enum.Enum):
    START = "waiting for http.response.start"
    BODY = "waiting for http.response.body"
    DONE = "response complete"


class _Collector:
    """One response's messages, checked as a small state machine.

    Calls `changed` when the answer completes or fails. Holds at most `max_body_bytes`
    of body: past it, and for an event stream, it fails with nothing kept.
    """

    def __init__(self, max_body_bytes: int, changed: Callable[[], None]) -> None:
        self._max_body_bytes = max_body_bytes
        self._phase = _Phase.START
        self._changed = changed
        self._status = 0
        self._headers: Headers = ()
        self._chunks: list[bytes] = []
        self._size = 0
        self.failure: ReplayError | None = None

    @property
    def complete(self) -> bool:
        """The whole answer is here."""
        return self._phase is _Phase.DONE

    @property
    def started(self) -> bool:
        """An answer began (or a message broke the order)."""
        return self._phase is not _Phase.START or self.failure is not None

    async def send(self, message: Message) -> None:
        if self.failure is not None:
            raise self.failure
        try:
            self._advance(message)
        except ReplayError as error:
            self.failure = error
            self._chunks = []  # a live stream's or an oversized body's bytes: not kept
            self._changed()
            raise
        if self._phase is _Phase.DONE:
            self._changed()

    def _advance(self, message: Message) -> None:
        kind = message.get("type")
        if self._phase is _Phase.START and kind == "http.response.start":
            self._status = _status(message.get("status"))
            self._headers = _headers(message.get("headers", ()))
            self._phase = _Phase.BODY
            if _media_type(self._headers) == _EVENT_STREAM:
                raise LiveStreamError("an event stream (text/event-stream)")
        elif self._phase is _Phase.BODY and kind == "http.response.body":
            body = message.get("body", b"")
            if not isinstance(body, bytes | bytearray | memoryview):
                raise InvalidResponseError(f"body must be bytes, got {type(body).__name__}")
            more = bool(message.get("more_body", False))
            self._size += len(body)
            if self._size > self._max_body_bytes:
                if more or self._chunks:
                    raise LiveStreamError(f"streamed past max_body_bytes={self._max_body_bytes}")
                raise BodyTooLargeError(f"body exceeds max_body_bytes={self._max_body_bytes}")
            if body:
                self._chunks.append(bytes(body))  # no copy of bytes; a bytearray may change
            if not more:
                self._phase = _Phase.DONE
        else:
            raise InvalidResponseError(f"unexpected {kind!r} message: {self._phase.value}")

    def timed_out(self) -> ReplayError:
        """What the replay's time running out means at this point of the answer."""
        if self._phase is _Phase.START:
            return ReplayTimeoutError("no answer began within the time limit")
        return LiveStreamError("still streaming when the time limit ran out")

    def result(self, **more: Any) -> ReplayedResponse:
        """The complete answer (`more`: `ReplayedResponse`'s other fields)."""
        if self.failure is not None:
            raise self.failure
        if self._phase is not _Phase.DONE:
            raise InvalidResponseError(f"app returned early: {self._phase.value}")
        return ReplayedResponse(self._status, self._headers, tuple(self._chunks), **more)


def _media_type(headers: Headers) -> bytes:
    """The `Content-Type` without parameters, lowercased; empty if none."""
    for name, value in headers:
        if name == b"content-type":
            return value.partition(b";")[0].strip().lower()
    return b""


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
