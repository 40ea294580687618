"""replay.py: snapshot -> scope, the synthetic receive/send, and the response checks."""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from asgi_worker.keys import RequestSnapshot, snapshot_from_scope
from asgi_worker.replay import (
    REPLAY_EXTENSION,
    BodyTooLargeError,
    InvalidResponseError,
    LeftRunningError,
    LiveStreamError,
    ReplayedResponse,
    ReplayMarker,
    ReplayTimeoutError,
    build_scope,
    finish,
    replay,
)

from .helpers import build_app

SNAPSHOT = RequestSnapshot(
    scheme="https",
    host="example.com:8443",
    root_path="",
    path="/echo",
    raw_path=b"/echo",
    query_string=b"a=1",
    headers=((b"accept-language", b"de"),),
)
LIMIT = 1024


def at(path: str, **changes: Any) -> RequestSnapshot:
    values: dict[str, Any] = {
        "scheme": "http",
        "host": "testserver",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": (),
    }
    values.update(changes)
    return RequestSnapshot(**values)


def sending(*messages: Message) -> Any:
    """A raw ASGI app that sends exactly `messages`."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for message in messages:
            await send(message)

    return app


START = {"type": "http.response.start", "status": 200, "headers": []}
BODY = {"type": "http.response.body", "body": b"ok"}


# --- success ---------------------------------------------------------------------------------


async def test_replay_of_a_starlette_app() -> None:
    app = build_app(None)
    result = await replay(app, at("/echo", query_string=b"q=1"), max_body_bytes=LIMIT)
    assert result.status == 200
    headers = dict(result.headers)
    assert headers[b"x-app"] == b"echo"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(result.body)).encode()
    assert b'"method":"GET"' in result.body
    assert b'"query":"q=1"' in result.body


async def test_streaming_body_is_joined_and_custom_status_kept() -> None:
    result = await replay(build_app(None), at("/stream"), max_body_bytes=LIMIT)
    assert result == ReplayedResponse(
        status=203,
        headers=((b"content-type", b"text/plain; charset=utf-8"),),
        chunks=(b"part0;", b"part1;", b"part2;", b"part3;"),
    )
    assert result.body == b"part0;part1;part2;part3;"


async def test_custom_status_and_header_names_lowercased() -> None:
    app = sending(
        {"type": "http.response.start", "status": 418, "headers": [(b"X-Teapot", b"Yes")]},
        {"type": "http.response.body", "body": b"short", "more_body": True},
        {"type": "http.response.body", "body": bytearray(b" and"), "more_body": True},
        {"type": "http.response.body", "body": memoryview(b" stout")},
    )
    result = await replay(app, SNAPSHOT, max_body_bytes=LIMIT)
    assert result == ReplayedResponse(418, ((b"x-teapot", b"Yes"),), (b"short", b" and", b" stout"))


async def test_body_exactly_at_the_limit_is_kept() -> None:
    app = sending(START, {"type": "http.response.body", "body": b"x" * LIMIT})
    assert (await replay(app, SNAPSHOT, max_body_bytes=LIMIT)).body == b"x" * LIMIT


# --- the scope -------------------------------------------------------------------------------


async def test_scope_holds_only_host_vary_headers_and_marker() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        assert await receive() == {"type": "http.request", "body": b"", "more_body": False}
        await send(START)
        await send(BODY)

    await replay(app, SNAPSHOT, max_body_bytes=LIMIT, state={"db": "pool"})
    (scope,) = seen
    assert scope["type"] == "http"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "https"
    assert scope["path"] == "/echo"
    assert scope["raw_path"] == b"/echo"
    assert scope["root_path"] == ""
    assert scope["query_string"] == b"a=1"
    assert scope["headers"] == [(b"host", b"example.com:8443"), (b"accept-language", b"de")]
    assert scope["client"] is None
    assert scope["server"] == ("example.com", 8443)
    assert list(scope["extensions"]) == [REPLAY_EXTENSION]
    assert isinstance(scope["extensions"][REPLAY_EXTENSION], ReplayMarker)
    assert scope["state"] == {"db": "pool"}


async def test_replayed_scope_drops_unkeyed_and_private_headers() -> None:
    incoming = {
        "type": "http",
        "method": "HEAD",
        "scheme": "http",
        "path": "/echo",
        "query_string": b"",
        "headers": [
            (b"host", b"shop.example"),
            (b"cookie", b"session=secret"),
            (b"authorization", b"Bearer secret"),
            (b"x-forwarded-host", b"evil.example"),
            (b"User-Agent", b"curl"),
            (b"Accept-Language", b"fr"),
        ],
        "client": ("203.0.113.9", 5555),
    }
    snapshot = snapshot_from_scope(incoming, ("accept-language",))
    scope = build_scope(snapshot, None)
    assert scope["headers"] == [(b"host", b"shop.example"), (b"accept-language", b"fr")]
    assert scope["method"] == "GET"
    assert scope["client"] is None
    assert "state" not in scope
    assert scope["server"] == ("shop.example", 80)


@pytest.mark.parametrize(
    ("host", "scheme", "server"),
    [
        ("example.com", "https", ("example.com", 443)),
        ("example.com:8080", "http", ("example.com", 8080)),
        ("[::1]:8000", "http", ("::1", 8000)),
        ("[::1]", "https", ("::1", 443)),
        ("", "http", None),
    ],
)
def test_server_from_host(host: str, scheme: str, server: Any) -> None:
    scope = build_scope(RequestSnapshot(scheme, host, "", "/", None, b"", ()), None)
    assert scope["server"] == server
    assert scope["headers"] == ([(b"host", host.encode())] if host else [])


async def test_lifespan_state_is_copied_per_replay() -> None:
    async def endpoint(request: Request) -> Response:
        before = getattr(request.state, "leak", "absent")
        request.state.leak = "written by a request"
        return PlainTextResponse(f"{request.state.db}:{before}")

    app = Starlette(routes=[Route("/s", endpoint)])
    shared = {"db": "pool-1"}
    first = await replay(app, at("/s"), max_body_bytes=LIMIT, state=shared)
    second = await replay(app, at("/s"), max_body_bytes=LIMIT, state=shared)
    assert first.body == b"pool-1:absent"
    assert second.body == b"pool-1:absent"
    assert shared == {"db": "pool-1"}


# --- failures --------------------------------------------------------------------------------


async def test_app_exception_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("from the app")

    with pytest.raises(KeyError, match="from the app"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_app_exception_after_start_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        raise LookupError("half way")

    with pytest.raises(LookupError, match="half way"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


@pytest.mark.parametrize(
    "messages",
    [
        (),
        (START,),
        (START, {"type": "http.response.body", "body": b"a", "more_body": True}),
    ],
    ids=["nothing", "start-only", "body-unfinished"],
)
async def test_app_returning_without_complete_response(messages: tuple[Message, ...]) -> None:
    with pytest.raises(InvalidResponseError, match="returned early"):
        await replay(sending(*messages), SNAPSHOT, max_body_bytes=LIMIT)


@pytest.mark.parametrize(
    "messages",
    [
        (BODY,),
        (START, START),
        (START, BODY, BODY),
        (START, BODY, START),
        ({"type": "http.response.trailers", "headers": []},),
        ({"status": 200},),
        (START, {"type": "websocket.send", "text": "hi"}),
    ],
    ids=[
        "body-before-start",
        "start-twice",
        "body-after-complete",
        "start-after-complete",
        "trailers",
        "no-type",
        "foreign-type",
    ],
)
async def test_message_out_of_order(messages: tuple[Message, ...]) -> None:
    with pytest.raises(InvalidResponseError, match="unexpected"):
        await replay(sending(*messages), SNAPSHOT, max_body_bytes=LIMIT)


@pytest.mark.parametrize(
    "start",
    [
        {"type": "http.response.start", "status": "200", "headers": []},
        {"type": "http.response.start", "status": 200.0, "headers": []},
        {"type": "http.response.start", "status": True, "headers": []},
        {"type": "http.response.start", "status": 99, "headers": []},
        {"type": "http.response.start", "status": 600, "headers": []},
        {"type": "http.response.start", "headers": []},
        {"type": "http.response.start", "status": 200, "headers": None},
        {"type": "http.response.start", "status": 200, "headers": 5},
        {"type": "http.response.start", "status": 200, "headers": [("a", "b")]},
        {"type": "http.response.start", "status": 200, "headers": [(b"a",)]},
        {"type": "http.response.start", "status": 200, "headers": [(b"a", b"b", b"c")]},
        {"type": "http.response.start", "status": 200, "headers": [(b"a", 1)]},
        {"type": "http.response.start", "status": 200, "headers": "ab"},
        {"type": "http.response.start", "status": 200, "headers": {b"ab": b"c"}},
    ],
    ids=[
        "status-str",
        "status-float",
        "status-bool",
        "status-99",
        "status-600",
        "status-missing",
        "headers-none",
        "headers-int",
        "headers-str-pairs",
        "header-single",
        "header-triple",
        "header-value-int",
        "headers-str",
        "headers-dict",
    ],
)
async def test_bad_status_or_headers(start: Message) -> None:
    with pytest.raises(InvalidResponseError):
        await replay(sending(start, BODY), SNAPSHOT, max_body_bytes=LIMIT)


@pytest.mark.parametrize("body", ["text", None, 5, [b"a"]], ids=["str", "none", "int", "list"])
async def test_bad_body_type(body: Any) -> None:
    message = {"type": "http.response.body", "body": body}
    with pytest.raises(InvalidResponseError, match="body must be bytes"):
        await replay(sending(START, message), SNAPSHOT, max_body_bytes=LIMIT)


async def test_app_swallowing_the_error_still_fails() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(BODY)  # out of order, and the app ignores the error
        await send(START)
        await send(BODY)

    async def swallowing(scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(Exception):
            await app(scope, receive, send)

    with pytest.raises(InvalidResponseError, match=r"unexpected 'http\.response\.body'"):
        await replay(swallowing, SNAPSHOT, max_body_bytes=LIMIT)


# --- body size limit -------------------------------------------------------------------------


def big_stream() -> StreamingResponse:
    async def chunks() -> Any:
        for _ in range(10):
            await asyncio.sleep(0)
            yield b"y" * 300

    return StreamingResponse(chunks())


async def test_body_over_limit_in_one_chunk() -> None:
    app = sending(START, {"type": "http.response.body", "body": b"x" * (LIMIT + 1)})
    with pytest.raises(BodyTooLargeError, match=f"max_body_bytes={LIMIT}"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_body_over_limit_across_streamed_chunks() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await big_stream()(scope, receive, send)

    with pytest.raises(LiveStreamError, match="streamed past max_body_bytes"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_body_over_limit_wrapped_in_a_task_group() -> None:
    # As StreamingResponse does for ASGI < 2.4: stream in one task, listen for disconnect
    # in another; the error comes out as an ExceptionGroup.
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        async with anyio.create_task_group() as group:
            group.start_soon(listen)
            await big_stream()(scope, receive, send)

    with pytest.raises(LiveStreamError, match="streamed past max_body_bytes"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_body_over_limit_wrapped_in_an_asyncio_task_group() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(big_stream()(scope, receive, send))

    with pytest.raises(LiveStreamError, match="streamed past max_body_bytes"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_body_over_limit_reraised_as_another_error() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await big_stream()(scope, receive, send)
        except Exception as error:
            raise RuntimeError("stream failed") from error

    with pytest.raises(LiveStreamError, match="streamed past max_body_bytes"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


async def test_body_over_limit_swallowed_by_the_app() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await big_stream()(scope, receive, send)
        except Exception:
            return

    with pytest.raises(LiveStreamError, match="streamed past max_body_bytes"):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT)


# --- live streams, time limits, and what the app does after its answer ------------------------


def event_stream(ended: list[str]) -> Any:
    """An endless event stream, as an SSE endpoint sends it; notes in `ended` when it stops."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
                }
            )
            while True:
                await send(
                    {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True}
                )
                await asyncio.sleep(0.01)
        finally:
            ended.append("stopped")

    return app


async def test_an_event_stream_is_a_live_stream_stopped_at_its_first_message() -> None:
    ended: list[str] = []
    began = asyncio.get_running_loop().time()
    with pytest.raises(LiveStreamError, match="event stream"):
        await replay(event_stream(ended), SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert asyncio.get_running_loop().time() - began < 1.0
    assert ended == ["stopped"]  # the app was cancelled, not left streaming


async def test_a_starlette_event_stream_is_stopped_too() -> None:
    async def events() -> Any:
        while True:
            yield "data: tick\n\n"
            await asyncio.sleep(0.01)

    app = StreamingResponse(events(), media_type="text/event-stream")
    with pytest.raises(LiveStreamError):
        await asyncio.wait_for(replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30), 2)


def endless_feed(chunk: bytes = b'{"n": 1}\n', pause: float = 0.01) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        while True:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(pause)

    return app


async def test_a_feed_still_streaming_at_the_time_limit_is_a_live_stream() -> None:
    with pytest.raises(LiveStreamError, match="time limit"):
        await replay(endless_feed(), SNAPSHOT, max_body_bytes=10**9, time_limit=0.2)


async def test_no_answer_begun_at_the_time_limit_is_a_replay_timeout() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(30)

    with pytest.raises(ReplayTimeoutError):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=0.1)


async def test_the_apps_own_timeout_error_is_the_apps_exception_not_the_time_limit() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise TimeoutError("the app's own, e.g. a database's")

    with pytest.raises(TimeoutError, match="the app's own") as caught:
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert not isinstance(caught.value, ReplayTimeoutError)


async def test_an_endless_fast_stream_is_read_in_bounded_memory() -> None:
    limit = 1024 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(LiveStreamError, match="streamed past"):
            await replay(
                endless_feed(b"x" * 65536, pause=0),
                SNAPSHOT,
                max_body_bytes=limit,
                time_limit=30,
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * limit, f"peak {peak} bytes while reading a stream cut at {limit}"


async def test_the_answer_is_final_once_sent_whatever_the_app_raises_after_it() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send(BODY)
        await asyncio.sleep(0.05)
        raise RuntimeError("a background task failed")

    began = asyncio.get_running_loop().time()
    result = await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert (result.status, result.body) == (200, b"ok")
    assert asyncio.get_running_loop().time() - began < 0.05  # not held up by the rest
    assert result.rest is not None
    error = await finish(result.rest, 5)
    assert isinstance(error, RuntimeError)


async def test_work_after_the_answer_still_running_at_the_limit_is_cancelled() -> None:
    cancelled: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send(BODY)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    result = await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert result.rest is not None
    assert isinstance(await finish(result.rest, 0.1), LeftRunningError)
    assert cancelled == [True]


async def test_a_starlette_background_task_does_not_change_the_answer() -> None:
    async def send_email() -> None:
        raise ConnectionError("smtp down")

    app = PlainTextResponse("hello", background=BackgroundTask(send_email))
    result = await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert (result.status, result.body) == (200, b"hello")
    assert result.rest is not None
    assert isinstance(await finish(result.rest, 5), ConnectionError)


async def test_an_app_that_ignores_its_cancellation_does_not_hold_the_replay_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(Exception):  # what send raises, and then the cancellation
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
        while not release.is_set():
            with contextlib.suppress(BaseException):
                await asyncio.sleep(0.01)

    began = asyncio.get_running_loop().time()
    with pytest.raises(LiveStreamError):
        await replay(app, SNAPSHOT, max_body_bytes=LIMIT, time_limit=30)
    assert asyncio.get_running_loop().time() - began < 3
    assert "ignored its cancellation" in caplog.text
    release.set()
    await asyncio.sleep(0.05)


async def test_the_replay_waits_for_an_outer_layer_that_passes_the_answer_on_later() -> None:
    # The layer outside the middleware awaits something (a session store, say) before it
    # sends the answer on with its cookie: that cookie must be seen.
    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send(START)
        await send(BODY)

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        marker = scope["extensions"][REPLAY_EXTENSION]
        assert marker.take("p")
        held: list[Message] = []

        async def later(message: Message) -> None:
            held.append(message)
            if message["type"] == "http.response.body":
                await asyncio.sleep(0.05)  # e.g. a round trip to a session store
                start = {**held[0], "headers": [(b"set-cookie", b"session=1")]}
                await send(start)
                await send(message)

        await inner(scope, receive, marker.tee(later))

    result = await replay(outer, SNAPSHOT, max_body_bytes=LIMIT, prefix="p", time_limit=30)
    assert result.leaving == ((b"set-cookie", b"session=1"),)
