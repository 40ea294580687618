"""Hostile input: generated ASGI scopes straight into `WorkerMiddleware`.

Whatever a server (or something in front of it) hands the middleware: paths with lone
surrogates, raw bytes, 64 KiB query strings of invalid UTF-8 and `%00`, arbitrary header
bytes, lowercase or made-up methods, optional scope keys left out. Properties:

- the middleware never raises, and always sends one valid ASGI response (one
  `http.response.start` with an int status, then body messages ending `more_body=False`);
- a miss's job stores what the app answered to the keyed parts only, and the next request
  for the same key is served exactly that;
- a request that differs in a keyed part never shares an entry (nor a digest); one that
  differs only in unkeyed parts always does;
- on Redis, every key name stays short (< 200 characters) whatever the request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from redis import Redis
from starlette.types import Message, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.core.keys import (
    InvalidHostError,
    normalize_host,
    scope_client,
    snapshot_from_scope,
)
from asgi_worker.core.replay import REPLAY_EXTENSION
from asgi_worker.testing import run_pending

from .conftest import REDIS_URL

VARY = ("accept-language",)
MAX_KEY_NAME = 200
CACHEABLE = {"GET", "HEAD"}
CREDENTIALS = {b"authorization", b"cookie"}

# --- strategies -------------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates too
# Lone surrogates are rare among all code points: mix them in on purpose.
surrogate_text = st.lists(
    st.one_of(st.sampled_from(["\ud800", "\udfff", "\udce9", "\ud83d"]), any_text), max_size=4
).map("".join)
methods = st.one_of(
    st.just("GET"),
    st.just("HEAD"),
    st.sampled_from(["get", "head", "Get", "POST", "OPTIONS", "PURGE", "CONNECT", "GET "]),
    st.text(TCHARS, min_size=1, max_size=12),
)
paths = st.one_of(
    any_text,
    surrogate_text.map(lambda text: "/" + text),
    st.sampled_from(["", "/", "/caf\udce9", "//", "/../admin", "/%2e%2e/"]),
)
QUERY_PIECES = [
    b"%00",
    b"\x00",
    b"\xff\xfe",
    b"%",
    b"%zz",
    b"%ED%A0%80",
    b"\xed\xa0\x80",
    b"\xc3\x28",
    b"a=1&a=2",
    b"=",
    b"&&",
    b"+",
    b"#",
    b"?",
]
query_piece = st.one_of(st.sampled_from(QUERY_PIECES), st.binary(min_size=1, max_size=12))
queries = st.one_of(
    st.binary(max_size=200),
    st.lists(query_piece, max_size=30).map(b"".join),
    # Up to 64 KiB: one piece repeated (cheap to generate, still full of odd bytes).
    st.tuples(query_piece, st.integers(16 * 1024, 64 * 1024)).map(
        lambda pair: (pair[0] * (pair[1] // len(pair[0]) + 1))[: pair[1]]
    ),
)
NAMED = [
    b"host",
    b"Host",
    b"HOST",
    b"accept-language",
    b"Accept-Language",
    b"if-none-match",
    b"cookie",
    b"Authorization",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"user-agent",
    b"content-length",
    b"transfer-encoding",
    b"",
]
header_names = st.one_of(st.sampled_from(NAMED), st.binary(max_size=30))
header_values = st.one_of(
    st.binary(max_size=100),
    st.sampled_from([b"", b"*", b'"x"', b"\x00", b"\xff" * 3, b"evil.example", b"de"]),
    st.binary(max_size=8).map(lambda chunk: chunk * 1000),
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)
servers = st.one_of(
    st.none(),
    st.tuples(st.one_of(st.none(), any_text), st.one_of(st.none(), st.integers(0, 65535))),
    st.sampled_from(
        [
            ("127.0.0.1", 8000),
            ("testserver", 80),
            ("/tmp/web.sock", None),  # a unix socket: [path, None]
            ("/tmp/\udcff.sock", None),  # its path as os.fsdecode gives undecodable bytes
            ("/run/\u65e5\u672c.sock", None),  # a path outside Latin-1
        ]
    ),
)
clients = st.one_of(st.none(), st.tuples(any_text, st.integers(0, 65535)))
schemes = st.one_of(st.none(), st.sampled_from(["http", "https", "", "HTTP", "ftp"]), any_text)

MISSING = object()  # a scope key left out


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(MISSING), strategy)


def header_container(pairs: list[tuple[bytes, bytes]], form: str) -> Any:
    if form == "lists":
        return [[name, value] for name, value in pairs]
    if form == "bytearrays":
        return [(bytearray(name), bytearray(value)) for name, value in pairs]
    return pairs


@st.composite
def scopes(draw: st.DrawFn, method: st.SearchStrategy[str] = methods) -> dict[str, Any]:
    """An HTTP scope; every key but `type` and `method` may be missing."""
    scope: dict[str, Any] = {"type": "http", "method": draw(method)}
    form = draw(st.sampled_from(["tuples", "lists", "bytearrays"]))
    candidates = {
        "asgi": st.just({"version": "3.0", "spec_version": "2.4"}),
        "http_version": st.sampled_from(["1.0", "1.1", "2", "3", "0.9"]),
        "scheme": schemes,
        "path": paths,
        "raw_path": st.one_of(st.none(), st.binary(max_size=60)),
        "root_path": surrogate_text,
        "query_string": queries,
        "headers": header_lists.map(lambda pairs: header_container(pairs, form)),
        "server": servers,
        "client": clients,
        "extensions": st.just({}),
    }
    for name, strategy in candidates.items():
        value = draw(optional(strategy))
        if value is not MISSING:
            scope[name] = value
    return scope


# --- the app behind the middleware, and one request through it ---------------------------------


@dataclass
class Inner:
    """A raw ASGI app that answers anything with a body describing what it saw."""

    replays: list[bytes] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)
    """The `client` of each replay: the enqueuing request's, in its ASGI shape, or None."""
    direct: int = 0
    runs: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        self.runs += 1
        names = sorted(bytes(name).lower() for name, _ in scope.get("headers") or ())
        seen = (self.runs, scope.get("path"), scope.get("query_string", b"")[:40], names)
        body = repr(seen).encode("utf-8", "backslashreplace")
        if REPLAY_EXTENSION in (scope.get("extensions") or {}):
            self.replays.append(body)
            self.clients.append(scope["client"])
            assert set(names) <= {b"host", *(name.encode() for name in VARY)}
        else:
            self.direct += 1
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})


@dataclass(frozen=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


async def call(middleware: WorkerMiddleware, scope: dict[str, Any]) -> Answer:
    """Send one request; check that exactly one valid ASGI response came back."""
    messages: list[Message] = []
    sent_request = False

    async def receive() -> Message:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)  # a client that waits for its answer
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.append(message)

    # A copy: the middleware may pass the scope on, and the app must not see our edits.
    await middleware(dict(scope), receive, send)
    return valid_response(messages)


def valid_response(messages: list[Message]) -> Answer:
    assert messages, "no response at all"
    start, *bodies = messages
    assert start["type"] == "http.response.start", messages
    status = start["status"]
    assert type(status) is int, status
    assert 100 <= status <= 599
    headers = [(bytes(name), bytes(value)) for name, value in start.get("headers", [])]
    for name, value in start.get("headers", []):
        assert isinstance(name, bytes | bytearray)
        assert isinstance(value, bytes | bytearray)
    assert bodies, "no http.response.body"
    for message in bodies[:-1]:
        assert message["type"] == "http.response.body", messages
        assert message.get("more_body", False) is True, messages
    assert bodies[-1]["type"] == "http.response.body", messages
    assert bodies[-1].get("more_body", False) is False, messages
    body = b"".join(bytes(message.get("body", b"")) for message in bodies)
    return Answer(status, headers, body)


def handled(scope: dict[str, Any]) -> bool:
    """Should the middleware serve this from the cache? (docs/requests.md's rules, restated.)"""
    if scope["method"] not in CACHEABLE:
        return False
    for name, value in scope.get("headers") or ():
        lowered = bytes(name).lower()
        if lowered in CREDENTIALS or lowered == b"transfer-encoding":
            return False  # credentials are private; a body is not keyed: both go to the app
        if lowered == b"content-length" and bytes(value).strip() not in (b"0", b""):
            return False
    return True


def valid_host(scope: dict[str, Any]) -> bool:
    """Is the first non-empty Host header (the one keyed) absent or a valid host[:port]?"""
    headers = scope.get("headers") or ()
    host = next((v for n, v in headers if bytes(n).lower() == b"host" and v), None)
    if host is None:
        return True
    try:
        normalize_host(bytes(host).decode("latin-1"), str(scope.get("scheme") or "http"))
    except InvalidHostError:
        return False
    return True


def check_middleware_answer(answer: Answer, *, head: bool) -> None:
    assert answer.header(b"cache-status") is not None
    if answer.status == 304:  # no body, and no length needed (RFC 9110 section 15.4.5)
        assert answer.body == b""
        return
    length = answer.header(b"content-length")
    assert length is not None
    if not head:
        assert int(length) == len(answer.body)


def memory_config() -> Config:
    return Config(redis_url="memory://", vary=VARY, retry_after=1)


def run(coroutine_factory: Callable[[], Any]) -> None:
    asyncio.run(coroutine_factory())


# --- properties on the memory:// backend ------------------------------------------------------

MEMORY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@MEMORY_SETTINGS
@given(scopes())
def test_any_scope_gets_one_valid_response_and_the_job_result(scope: dict[str, Any]) -> None:
    async def scenario() -> None:
        inner = Inner()
        middleware = WorkerMiddleware(inner, config=memory_config())
        async with LifespanManager(middleware):
            head = scope["method"] == "HEAD"
            first = await call(middleware, scope)
            if not handled(scope):
                assert (first.status, first.header(b"x-app")) == (200, b"1")
                assert inner.direct == 1
                assert inner.replays == []
                return
            if not valid_host(scope):
                # Not host[:port]: a 400 from the middleware, nothing looked up or queued.
                assert first.status == 400
                assert await middleware.drain() == 0
                assert (inner.direct, inner.replays) == (0, [])
                return
            assert first.status == 202
            check_middleware_answer(first, head=head)
            assert await middleware.drain() == 1
            assert len(inner.replays) == 1
            assert inner.direct == 0
            # The replay carries the client of the request that enqueued it, or none.
            assert inner.clients == [scope_client(scope)]

            second = await call(middleware, scope)
            check_middleware_answer(second, head=head)
            assert second.header(b"cache-status") == b"asgi-worker; hit"
            if second.status == 304:  # the scope carried a matching If-None-Match
                assert second.body == b""
            else:
                assert second.status == 200
                assert second.header(b"x-app") == b"1"
                assert second.body == (b"" if head else inner.replays[0])
            assert await middleware.drain() == 0
            assert inner.direct == 0

    run(scenario)


KEYED = ["path", "root_path", "query", "scheme", "host", "vary", "raw_path"]
UNKEYED = ["add-header", "client", "http_version", "head", "header-case", "server"]
# Not a header that changes the key or the handling (a body goes straight to the app).
PLAIN_NAMES = st.binary(min_size=1, max_size=20).filter(
    lambda name: (
        name.lower()
        not in {
            b"host",
            b"accept-language",
            b"if-none-match",
            b"transfer-encoding",
            b"content-length",
            *CREDENTIALS,
        }
    )
)
plain_headers = st.lists(
    st.tuples(st.one_of(PLAIN_NAMES, st.sampled_from(NAMED[:5])), header_values), max_size=6
)


@st.composite
def cacheable_scopes(draw: st.DrawFn) -> dict[str, Any]:
    scope = draw(scopes(method=st.just("GET")))
    scope["path"] = draw(paths)
    scope["headers"] = draw(plain_headers)
    return scope


def first_index(headers: list[tuple[bytes, bytes]], name: bytes) -> int | None:
    return next((i for i, (key, _) in enumerate(headers) if key.lower() == name), None)


def mutate(scope: dict[str, Any], how: str, data: st.DataObject) -> dict[str, Any]:
    """A copy of `scope` changed in one keyed or unkeyed part."""
    changed = dict(scope)
    headers = list(scope["headers"])
    if how == "path":
        changed["path"] += "x"
    elif how == "root_path":
        changed["root_path"] = scope.get("root_path", "") + "/r"
    elif how == "query":
        changed["query_string"] = scope.get("query_string", b"") + b"&z"
    elif how == "scheme":
        changed["scheme"] = "http" if (scope.get("scheme") or "http") == "https" else "https"
    elif how == "host":
        at = first_index([(k, v) for k, v in headers if v], b"host")
        if at is None:
            assume(snapshot_from_scope(scope, VARY).host != "mutated.invalid")
            headers.insert(0, (b"host", b"mutated.invalid"))
        else:
            host_at = next(i for i, (k, v) in enumerate(headers) if k.lower() == b"host" and v)
            headers[host_at] = (headers[host_at][0], headers[host_at][1] + b"x")
    elif how == "vary":
        at = first_index(headers, b"accept-language")
        if at is None:
            headers.append((b"accept-language", b"mutated"))
        else:
            headers[at] = (headers[at][0], headers[at][1] + b"x")
    elif how == "raw_path":
        raw = scope.get("raw_path")
        changed["raw_path"] = b"/mutated" if raw is None else raw + b"x"
    elif how == "add-header":
        name = data.draw(PLAIN_NAMES)
        at = data.draw(st.integers(0, len(headers)))
        headers.insert(at, (name, data.draw(header_values)))
    elif how == "client":
        changed["client"] = ("6.6.6.6", 666)
    elif how == "http_version":
        changed["http_version"] = "2" if scope.get("http_version") != "2" else "1.1"
    elif how == "head":
        changed["method"] = "HEAD"
    elif how == "header-case":
        headers = [(key.upper(), value) for key, value in headers]
    elif how == "server":
        # Unkeyed only while a Host header names the host.
        assume(any(k.lower() == b"host" and v for k, v in headers))
        changed["server"] = ("10.9.8.7", 8123)
    changed["headers"] = headers
    return changed


@MEMORY_SETTINGS
@given(cacheable_scopes(), st.sampled_from(KEYED + UNKEYED), st.data())
def test_keyed_difference_never_shares_an_entry_unkeyed_always_does(
    scope: dict[str, Any], how: str, data: st.DataObject
) -> None:
    other = mutate(scope, how, data)
    assume(valid_host(scope) and valid_host(other))  # else a 400, see the test above
    keyed = how in KEYED
    first_digest = snapshot_from_scope(scope, VARY).digest
    other_digest = snapshot_from_scope(other, VARY).digest
    assert (first_digest != other_digest) is keyed

    async def scenario() -> None:
        inner = Inner()
        middleware = WorkerMiddleware(inner, config=memory_config())
        async with LifespanManager(middleware):
            assert (await call(middleware, scope)).status == 202
            assert await middleware.drain() == 1
            stored = await call(middleware, scope)
            assert (stored.status, stored.body) == (200, inner.replays[0])

            answer = await call(middleware, other)
            if keyed:
                assert answer.status == 202  # a miss: never the other request's entry
                assert await middleware.drain() == 1
                assert len(inner.replays) == 2
                again = await call(middleware, other)
                assert (again.status, again.body) == (200, inner.replays[1])
                assert inner.replays[1] != inner.replays[0]
            else:
                assert answer.status == 200
                assert answer.header(b"cache-status") == b"asgi-worker; hit"
                assert answer.body == (b"" if how == "head" else stored.body)
                assert answer.header(b"content-length") == stored.header(b"content-length")
                assert await middleware.drain() == 0
            assert inner.direct == 0

    run(scenario)


# --- a smaller run on Redis, with a real arq worker ---------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scopes())
def test_on_redis_any_scope_is_answered_and_key_names_stay_short(scope: dict[str, Any]) -> None:
    prefix = f"awtest-{uuid.uuid4().hex[:12]}"
    config = Config(redis_url=REDIS_URL, prefix=prefix, vary=VARY, retry_after=1)
    redis = Redis.from_url(REDIS_URL)

    async def scenario() -> None:
        inner = Inner()
        middleware = WorkerMiddleware(inner, config=config)
        async with LifespanManager(middleware):
            head = scope["method"] == "HEAD"
            first = await call(middleware, scope)
            if not handled(scope):
                assert first.status == 200
                assert inner.direct == 1
                return
            if not valid_host(scope):
                assert first.status == 400
                assert await run_pending(middleware, config) == 0
                return
            assert first.status == 202
            check_middleware_answer(first, head=head)
            assert await run_pending(middleware, config) == 1
            assert len(inner.replays) == 1
            second = await call(middleware, scope)
            check_middleware_answer(second, head=head)
            assert second.status in (200, 304)
            if second.status == 200:
                assert second.body == (b"" if head else inner.replays[0])

    try:
        try:
            run(scenario)
        finally:
            # Checked even if the scenario failed: a long key name is a finding of its own.
            names = [
                key.decode("utf-8", "backslashreplace")
                for pattern in (f"{prefix}*", f"arq:*{prefix}*")
                for key in redis.scan_iter(match=pattern, count=1000)
            ]
            for name in names:
                assert len(name) < MAX_KEY_NAME, name
        if handled(scope) and valid_host(scope):
            assert names, "nothing was stored"
    finally:
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            for key in redis.scan_iter(match=pattern, count=1000):
                redis.delete(key)
        redis.close()


def test_strategies_reach_the_interesting_cases() -> None:
    # The properties above are only as good as what they are fed: make sure the scope
    # strategy really produces the hostile parts this file promises.
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(scopes())
    def observe(scope: dict[str, Any]) -> None:
        path = scope.get("path", "")
        if any(0xD800 <= ord(char) <= 0xDFFF for char in path):
            seen.add("lone-surrogate-path")
        if len(scope.get("query_string", b"")) >= 16 * 1024:
            seen.add("big-query")
        if scope["method"] in {"get", "head", "Get"}:
            seen.add("lowercase-method")
        for name in ("raw_path", "server", "headers", "path", "query_string"):
            if name not in scope:
                seen.add(f"no-{name}")
        if handled(scope):
            seen.add("handled")

    observe()
    wanted = {
        "lone-surrogate-path",
        "big-query",
        "lowercase-method",
        "no-raw_path",
        "no-server",
        "no-headers",
        "no-path",
        "no-query_string",
        "handled",
    }
    assert wanted <= seen, wanted - seen


# --- the inputs the properties found, pinned one by one -----------------------------------------


async def answer_twice(scope: dict[str, Any]) -> tuple[Answer, Answer, Inner]:
    """Miss, run the job, ask again: (first answer, second answer, the app)."""
    inner = Inner()
    middleware = WorkerMiddleware(inner, config=memory_config())
    async with LifespanManager(middleware):
        first = await call(middleware, scope)
        await middleware.drain()
        second = await call(middleware, scope)
    return first, second, inner


async def test_scope_without_headers_is_served() -> None:
    # Every other part of the library reads headers as optional (scope.get("headers")).
    scope = {"type": "http", "method": "GET", "path": "/x", "query_string": b""}
    first, second, inner = await answer_twice(scope)
    assert first.status == 202
    assert (second.status, second.body) == (200, inner.replays[0])


@pytest.mark.parametrize(
    "server_host",
    [
        # A unix socket whose path has bytes that are not UTF-8: os.fsdecode gives a lone
        # surrogate, and an HTTP/1.0 request without Host leaves the key to `server`.
        "/tmp/\udcff.sock",
        "/run/\u65e5\u672c.sock",  # outside Latin-1
    ],
    ids=["undecodable-bytes", "outside-latin1"],
)
async def test_an_odd_server_host_is_served(server_host: str) -> None:
    scope = {
        "type": "http",
        "http_version": "1.0",
        "method": "GET",
        "path": "/x",
        "query_string": b"",
        "headers": [],
        "server": (server_host, None),
    }
    first, second, inner = await answer_twice(scope)
    assert first.status == 202
    # Not a stored "500 Internal Server Error" for a request the app answers fine.
    assert (second.status, second.body) == (200, inner.replays[0])
