"""Replay fidelity: the cached response is the app's own response, in every framework.

The model: what `WorkerMiddleware` stores is exactly what the app *inside* it answers for
the keyed request, as if the request had come through the server. Layers outside the
middleware run once, when the hit is served, and whatever they contribute to the scope
(FastAPI's `request.app`, Litestar's app and route handler, a `Mount`'s root_path) is
there in the replay. So, for every case:

    bare app's response  ==  the middleware app's cached response (after the replay)

in status, body bytes and headers, except `date` and `server` (the server's) and the
cache's documented additions: `age`, `cache-status`, `etag` (when the app sent none) and
`content-length` (always set from the stored body, which is checked separately).

Each test runs a batch of cases on one app (all first GETs, one `run_pending`, then all
second GETs) and reports every failing case by name, so one fault does not hide another.
The apps are in tests/frameworks.py.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.testing import run_pending

from .frameworks import (
    BINARY,
    CHUNKS,
    FRAMEWORKS,
    GREETING,
    MOUNTABLE,
    ORIGIN,
    RESOURCE,
    TRUSTED_HOST,
    Around,
    Framework,
    fastapi_app,
    mounted,
    starlette_app,
)
from .helpers import BASE_URL, make_config

pytestmark = [
    # Django warns that it consumes a sync view's streaming iterator in a thread: that is
    # the sync-view case itself.
    pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous"),
]

BACKENDS = ["memory", "redis"]

# Headers the comparison leaves out: the server's, and the cache's documented additions.
# `etag` is left out only when the app sent none (then the cache adds one).
IGNORED = frozenset({"date", "server", "age", "cache-status", "content-length"})

UNICODE_NAME = "%C3%A9t%C3%A9%20%E2%98%83"  # "été ☃", percent-encoded in the URL
TAGS = "tag=%C3%A9&tag=%C3%BC"  # tag=é&tag=ü
ITEM = {"name": "\u00e9t\u00e9 \u2603", "tags": ["\u00e9", "\u00fc"], "greeting": GREETING}


# --- Requests and responses --------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """One response as it came off the wire: raw headers, raw (undecoded) body."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def hit(self) -> bool:
        return any(
            "hit" in (part.strip() for part in value.split(";"))
            for value in self.values("cache-status")
        )

    def brief(self) -> str:
        status = self.values("cache-status")
        return f"{self.status} (cache-status: {status[0] if status else 'none'})"


@dataclass(frozen=True)
class Case:
    """One request, and how its cached answer must relate to the bare app's answer."""

    name: str
    path: str
    status: int
    """What the bare app answers: checked first, or the case would prove nothing."""
    mode: str = "cached"
    """cached: first GET 202, second GET a hit equal to the bare answer.
    status: the same, comparing the status only (see the "handler raises" case).
    pass: first GET 202, second GET must not come from the cache, equal to the bare answer
    (Set-Cookie compared by presence: the session differs).
    direct: the middleware never sees it; the first answer equals the bare answer."""
    headers: tuple[tuple[str, str], ...] = ()
    root_path: str = ""
    head: bool = False
    """After the hit, a HEAD of the same URL: a hit with the GET's headers, no body."""
    expect: Callable[[Fetched], bool] | None = field(default=None, compare=False)
    """What the bare answer must show for the case to mean anything."""


def json_is(value: Any) -> Callable[[Fetched], bool]:
    return lambda response: json.loads(response.body) == value


def body_has(part: str) -> Callable[[Fetched], bool]:
    return lambda response: part.encode() in response.body


def header_is(name: str, *values: str) -> Callable[[Fetched], bool]:
    return lambda response: response.values(name) == list(values)


def location_ends(suffix: str) -> Callable[[Fetched], bool]:
    return lambda response: (
        len(response.values("location")) == 1 and response.values("location")[0].endswith(suffix)
    )


async def fetch(client: httpx.AsyncClient, method: str, case: Case) -> Fetched:
    # Every request comes from a new client: a cookie kept from an earlier answer would
    # make the middleware pass the request to the app (credentials are not shared).
    client.cookies.clear()
    async with client.stream(method, case.path, headers=dict(case.headers)) as response:
        body = b"".join([chunk async for chunk in response.aiter_raw()])
    headers = tuple(
        (name.decode("latin-1").lower(), value.decode("latin-1"))
        for name, value in response.headers.raw
    )
    return Fetched(response.status_code, headers, body)


@asynccontextmanager
async def lifespan_state(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Run the app's lifespan around the block; yield the state its startup filled.

    Not `LifespanManager.app`: that hands every request the very same state dict, and
    Litestar keeps per-request data in it (one request's "response started" leaks into
    the next one's error handling).
    """
    captured: dict[str, Any] = {}

    async def capture(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            captured.update(state=scope.get("state"))
        await app(scope, receive, send)

    async with LifespanManager(capture):
        yield captured["state"] if captured.get("state") is not None else {}


def with_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """As servers do: each request gets a shallow copy of the lifespan state."""

    async def app_with_state(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return app_with_state


class Served:
    """Clients on one app (one per root_path), and the bodies of its HEAD responses.

    httpx drops whatever body comes with a HEAD response before the test sees it, so the
    app is tapped to record the body bytes it really sent.
    """

    def __init__(self, app: ASGIApp, stack: AsyncExitStack) -> None:
        self._app = app
        self._stack = stack
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.head_bodies: list[bytes] = []

    def client(self, root_path: str = "") -> httpx.AsyncClient:
        if root_path not in self._clients:
            # The app's own answer to an exception is what it sends (Starlette sends its
            # 500 page, then re-raises), not an error in the test.
            transport = httpx.ASGITransport(
                app=self._tapped, root_path=root_path, raise_app_exceptions=False
            )
            client = httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=30)
            self._clients[root_path] = client
            self._stack.push_async_callback(client.aclose)
        return self._clients[root_path]

    async def _tapped(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
            await send(message)

        try:
            await self._app(scope, receive, send_and_record)
        finally:
            self.head_bodies.append(b"".join(chunks))


@asynccontextmanager
async def serving(app: ASGIApp, *, lifespan: bool) -> AsyncIterator[Served]:
    """`app` served to httpx clients, with its lifespan run around them."""
    async with AsyncExitStack() as stack:
        if lifespan:
            app = with_state(app, await stack.enter_async_context(lifespan_state(app)))
        yield Served(app, stack)


# --- Comparison --------------------------------------------------------------------------


def header_multiset(response: Fetched, ignored: frozenset[str], *, cookies: bool) -> Counter[Any]:
    """Headers as a multiset of (name, value): order-insensitive, repeats counted."""
    return Counter(
        (name, value if cookies or name != "set-cookie" else "<present>")
        for name, value in response.headers
        if name not in ignored
    )


def comparable_body(response: Fetched) -> bytes:
    # GzipFile writes the time of compression into the gzip header (MTIME, bytes 4-7,
    # RFC 1952): two compressions of the same text a second apart differ there only.
    body = response.body
    if response.values("content-encoding") == ["gzip"] and body[:2] == b"\x1f\x8b":
        return body[:4] + b"\0\0\0\0" + body[8:]
    return body


def differences(
    want: Fetched, got: Fetched, *, status_only: bool = False, cookies: bool = True
) -> list[str]:
    """How `got` differs from the app's own answer `want` (empty if it does not)."""
    problems = []
    if got.status != want.status:
        problems.append(f"status {got.status}, the app answered {want.status}")
    if status_only:
        return problems
    ignored = IGNORED if want.values("etag") else IGNORED | {"etag"}
    wanted = header_multiset(want, ignored, cookies=cookies)
    have = header_multiset(got, ignored, cookies=cookies)
    if extra := sorted((have - wanted).elements()):
        problems.append(f"headers the app did not send: {extra}")
    if missing := sorted((wanted - have).elements()):
        problems.append(f"headers of the app missing: {missing}")
    got_body, want_body = comparable_body(got), comparable_body(want)
    if got_body != want_body:
        at = next(
            (i for i, (a, b) in enumerate(zip(got_body, want_body, strict=False)) if a != b),
            min(len(got_body), len(want_body)),
        )
        problems.append(
            f"body differs at byte {at} ({len(got_body)} bytes, the app's {len(want_body)}): "
            f"{got_body[at : at + 40]!r} != {want_body[at : at + 40]!r}"
        )
    return problems


def length_problems(got: Fetched, length: int, want: Fetched | None = None) -> list[str]:
    """The cache frames the stored body as RFC 9110 section 8.6 asks: exactly one
    Content-Length, and right; none on a 1xx or 204; on a 304, the app's own (its 200's).
    """
    if got.status < 200 or got.status == 204:
        wanted = []
    elif got.status == 304:
        wanted = [] if want is None else want.values("content-length")
    else:
        wanted = [str(length)]
    if got.values("content-length") != wanted:
        return [f"content-length {got.values('content-length')}, wanted {wanted}"]
    return []


async def run_cases(
    bare: ASGIApp, app: ASGIApp, cases: list[Case], *, lifespan: bool = True
) -> list[str]:
    """Run the batch; return one line per problem, each naming its case."""
    failures: list[str] = []

    def report(case: Case, problems: list[str], what: str = "") -> None:
        failures.extend(f"[{case.name}]{what} {problem}" for problem in problems)

    async with (
        serving(bare, lifespan=lifespan) as bare_served,
        serving(app, lifespan=lifespan) as served,
    ):
        wanted: dict[str, Fetched] = {}
        for case in cases:
            want = wanted[case.name] = await fetch(bare_served.client(case.root_path), "GET", case)
            if want.status != case.status or (case.expect and not case.expect(want)):
                # The test's own premise failed: the case would prove nothing.
                report(case, [f"the bare app answered {want.brief()}: {want.body[:200]!r}"])

        for case in cases:
            first = await fetch(served.client(case.root_path), "GET", case)
            if case.mode == "direct":
                report(case, differences(wanted[case.name], first))
            elif first.status != 202:
                report(case, [f"first GET answered {first.brief()}, expected 202 (a miss)"])

        misses = [case for case in cases if case.mode != "direct"]
        if not await run_jobs(app, len(misses), "the misses", failures):
            return failures  # no job ran: the second GETs would only repeat that

        for case in misses:
            want = wanted[case.name]
            second = await fetch(served.client(case.root_path), "GET", case)
            if case.mode == "pass":
                if second.hit:
                    report(case, [f"served from the cache: {second.brief()}"])
                report(case, differences(want, second, cookies=False))
                continue
            if not second.hit:
                report(case, [f"second GET is not a hit: {second.brief()}"])
            report(case, differences(want, second, status_only=case.mode == "status"))
            report(case, length_problems(second, len(second.body), want))
            if case.head:
                head = await fetch(served.client(case.root_path), "HEAD", case)
                head = dataclasses.replace(head, body=served.head_bodies[-1])
                if not head.hit:
                    report(case, [f"not a hit: {head.brief()}"], " HEAD:")
                body_of_get = Fetched(want.status, want.headers, b"")
                report(case, differences(body_of_get, head), " HEAD:")
                report(case, length_problems(head, len(want.body), want), " HEAD:")
    return failures


async def run_jobs(app: ASGIApp, expected: int, what: str, failures: list[str]) -> bool:
    """`run_pending(app)` (the served app); report a wrong job count or an error."""
    try:
        ran = await run_pending(app)
    except Exception as error:  # reported with the rest of the batch
        failures.append(f"[{what}] run_pending(app) raised {error!r}")
        return False
    if ran != expected:
        failures.append(f"[{what}] run_pending ran {ran} jobs, expected {expected}")
    return True


def config_for(backend: str, prefix: str, **overrides: Any) -> Config:
    """memory://, or the test Redis under this test's prefix (cleaned by the fixture)."""
    if backend == "memory":
        overrides["redis_url"] = "memory://"
    return make_config(prefix, **overrides)


def framework_id(framework: Framework) -> str:
    return framework.name


# --- Cases 1-11 and 14: the same endpoints in every framework ----------------------------


def endpoint_cases(framework: Framework) -> list[Case]:
    base = framework.base
    redirect = framework.redirect_status
    cases = [
        Case("1 json, unicode path param", f"{base}/items/{UNICODE_NAME}?{TAGS}", 200,
             expect=json_is(ITEM)),
        Case("2 app state", f"{base}/state", 200, expect=json_is({"g": GREETING})),
        # Litestar routes before its (per-route) middleware: its router's 404 never
        # reaches the cache, and must be the plain answer of the app.
        Case("3 404 from the router", f"{base}/nowhere", 404,
             mode="direct" if framework.router_before_middleware else "cached"),
        Case("3 404 raised by the handler", f"{base}/missing", 404),
        # The app's own answer to an exception: its 500 page, also where the handler
        # sits outside the cache (Starlette's ServerErrorMiddleware, which sends the
        # page and then re-raises).
        Case("4 handler raises", f"{base}/boom", 500),
        Case("5 redirect", f"{base}/redirect", redirect,
             expect=location_ends(f"{base}/items/target")),
        Case("5 redirect under root_path", f"/api{base}/redirect", redirect, root_path="/api",
             expect=location_ends(f"/api{base}/items/target")),
        Case("6 streaming", f"{base}/stream", 200, expect=lambda r: r.body == b"".join(CHUNKS)),
        Case("7 binary", f"{base}/binary", 200, expect=lambda r: r.body == BINARY),
        Case("8 HEAD after GET", f"{base}/items/head?tag=h", 200, head=True),
        Case("11 base_url and url_for", f"{base}/where", 200,
             expect=body_has(f"{BASE_URL}{base}/where")),
        Case("11 root_path: base_url and url_for", f"/api{base}/where", 200, root_path="/api",
             expect=body_has(f"{BASE_URL}/api{base}/where")),
        Case("11 root_path: json", f"/api{base}/items/{UNICODE_NAME}?{TAGS}", 200,
             root_path="/api", expect=json_is(ITEM)),
        Case("14 Vary: *", f"{base}/vary-star", 200, mode="pass",
             expect=header_is("vary", "*")),
    ]  # fmt: skip
    if framework.repeated_headers:
        cases.append(
            Case("9 repeated headers", f"{base}/multi", 200,
                 expect=header_is("x-multi", "first", "second"))
        )  # fmt: skip
    if framework.lifespan:
        cases.append(
            Case("10 lifespan resource", f"{base}/lifespan", 200,
                 expect=json_is({"resource": RESOURCE}))
        )  # fmt: skip
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("framework", FRAMEWORKS, ids=framework_id)
async def test_cached_response_is_the_apps_response(
    framework: Framework, backend: str, prefix: str, redis: Redis
) -> None:
    config = config_for(backend, prefix)
    bare, app = framework.build(None), framework.build(config)
    failures = await run_cases(bare, app, endpoint_cases(framework), lifespan=framework.lifespan)
    assert not failures, "\n".join(failures)


# --- Case 12: WorkerMiddleware inside a mounted sub-app ----------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("framework", MOUNTABLE, ids=framework_id)
async def test_middleware_inside_a_mount(
    framework: Framework, backend: str, prefix: str, redis: Redis
) -> None:
    # The served app, and the one run_pending gets, is the OUTER app.
    config = config_for(backend, prefix)
    bare, app = mounted(framework.build, None), mounted(framework.build, config)
    cases = [
        Case("12 mount: base_url and url_for", "/sub/where", 200,
             expect=body_has(f"{BASE_URL}/sub/where")),
        Case("12 mount: json", f"/sub/items/{UNICODE_NAME}?{TAGS}", 200, expect=json_is(ITEM)),
        Case("12 mount: app state", "/sub/state", 200, expect=json_is({"g": GREETING})),
        Case("12 mount: redirect", "/sub/redirect", 307,
             expect=location_ends("/sub/items/target")),
        Case("12 mount under root_path: base_url and url_for", "/api/sub/where", 200,
             root_path="/api", expect=body_has(f"{BASE_URL}/api/sub/where")),
    ]  # fmt: skip
    failures = await run_cases(bare, app, cases)
    assert not failures, "\n".join(failures)


# --- Case 13: Starlette middlewares inside and outside WorkerMiddleware ------------------


def around_cases(kind: str, side: str) -> list[Case]:
    origin = (("origin", ORIGIN),)
    if kind == "cors-any":
        return [
            Case("13 CORS allow_origins=*", "/items/cors?tag=c", 200, headers=origin,
                 expect=lambda r: r.values("access-control-allow-origin") == ["*"]
                 and r.values("vary") == ["Origin"])
        ]  # fmt: skip
    if kind == "cors-listed":
        return [
            Case("13 CORS listed origin", "/items/cors?tag=c", 200, headers=origin,
                 expect=lambda r: r.values("access-control-allow-origin") == [ORIGIN]
                 and r.values("vary") == ["Origin"])
        ]  # fmt: skip
    if kind == "gzip":
        return [
            Case("13 GZip", "/text", 200, headers=(("accept-encoding", "gzip"),),
                 expect=header_is("content-encoding", "gzip")),
            Case("13 GZip, small response", "/items/gzip?tag=g", 200,
                 headers=(("accept-encoding", "gzip"),), expect=json_is(
                     {"name": "gzip", "tags": ["g"], "greeting": GREETING})),
        ]  # fmt: skip
    if kind == "trusted-host":
        return [
            Case("13 TrustedHost, trusted", "/items/th?tag=t", 200,
                 headers=(("host", TRUSTED_HOST),)),
            # Outside, TrustedHost rejects it before the cache; inside, the rejection is
            # the app's answer for that (keyed) Host and is cached like any other.
            Case("13 TrustedHost, untrusted", "/items/th?tag=t", 400,
                 headers=(("host", "evil.example"),),
                 mode="direct" if side == "outside" else "cached"),
        ]  # fmt: skip
    assert kind == "session"
    return [
        # A response that sets a cookie is never shared: hit-for-pass, to the app.
        Case("13 Session, sets the cookie", "/session", 200, mode="pass",
             expect=lambda r: len(r.values("set-cookie")) == 1),
        Case("13 Session, session untouched", "/items/s?tag=s", 200,
             expect=header_is("set-cookie")),
    ]  # fmt: skip


# Request headers a middleware's answer depends on, which must then be in the key.
AROUND_VARY = {"cors-any": ("origin",), "cors-listed": ("origin",), "gzip": ("accept-encoding",)}


@pytest.mark.parametrize("side", ["inside", "outside"])
@pytest.mark.parametrize("kind", ["cors-any", "cors-listed", "gzip", "trusted-host", "session"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build", [fastapi_app, starlette_app], ids=["fastapi", "starlette"])
async def test_middleware_around_the_worker(
    build: Callable[..., ASGIApp], backend: str, kind: str, side: str, prefix: str, redis: Redis
) -> None:
    config = config_for(backend, prefix, vary=AROUND_VARY.get(kind, ()))
    around = Around(kind, side)
    bare, app = build(None, around), build(config, around)
    failures = await run_cases(bare, app, around_cases(kind, side))
    assert not failures, "\n".join(failures)


# --- Case 15: the Host header ------------------------------------------------------------

BAD_HOSTS = ["example.com:80x", "a:b:c", "127.0.0.1:8201."]
# Each names the entry of example.com (a port is keyed by value: 000080 is 80).
SAME_HOSTS = ["EXAMPLE.com:80", "example.com.", "example.com:000080"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("framework", FRAMEWORKS, ids=framework_id)
async def test_host_header(framework: Framework, backend: str, prefix: str, redis: Redis) -> None:
    config = config_for(backend, prefix)
    bare, app = framework.build(None), framework.build(config)
    path = f"{framework.base}/items/host?tag=h"
    failures: list[str] = []
    async with (
        serving(bare, lifespan=framework.lifespan) as bare_served,
        serving(app, lifespan=framework.lifespan) as served,
    ):
        http = served.client()
        for host in BAD_HOSTS:
            case = Case(f"15 bad Host {host!r}", path, 400, headers=(("host", host),))
            for attempt in ("first", "second"):
                got = await fetch(http, "GET", case)
                if got.status != 400:
                    failures.append(f"[{case.name}] {attempt} GET answered {got.brief()}, not 400")
        await run_jobs(app, 0, "15 bad Hosts", failures)

        plain = Case("15 Host example.com", path, 200, headers=(("host", "example.com"),))
        want = await fetch(bare_served.client(), "GET", plain)
        assert want.status == 200, want.brief()
        first = await fetch(http, "GET", plain)
        if first.status != 202:
            failures.append(f"[{plain.name}] first GET answered {first.brief()}, expected 202")
        await run_jobs(app, 1, plain.name, failures)
        for host in SAME_HOSTS:
            case = Case(
                f"15 Host {host!r} shares example.com", path, 200, headers=(("host", host),)
            )
            got = await fetch(http, "GET", case)
            if not got.hit:
                failures.append(f"[{case.name}] not a hit: {got.brief()}")
            failures.extend(f"[{case.name}] {problem}" for problem in differences(want, got))
    assert not failures, "\n".join(failures)


# --- Cases 16-21: after the answer, framing, outer error handlers, outer Vary -----------

ERROR_PAGE = "<h1>Sorry: the app's own error page</h1>"


class MapValueErrors:
    """A middleware of the app's, outside the cache: it answers a `ValueError` with a 404."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except ValueError as error:
            response = JSONResponse({"missing": str(error)}, status_code=404)
            await response(scope, receive, send)


def fidelity_app(build: str, config: Config | None) -> ASGIApp:
    """A small app of each kind the issue tried: each answer checked against the bare app."""

    async def after_answer_fails() -> None:
        raise ConnectionError("smtp down")

    async def background(request: Request) -> Response:
        return PlainTextResponse("hello", background=BackgroundTask(after_answer_fails))

    async def no_content(request: Request) -> Response:
        return Response(status_code=204, headers={"x-app": "204"})

    async def not_modified(request: Request) -> Response:
        return Response(status_code=304, headers={"etag": '"v1"', "content-length": "11"})

    async def value_error(request: Request) -> Response:
        raise ValueError("no such report")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    async def session_read(request: Request) -> Response:
        return JSONResponse({"user": request.session.get("user")})  # read, not written

    async def error_page(request: Request, error: Exception) -> Response:
        return HTMLResponse(ERROR_PAGE, status_code=500)

    routes = [
        Route("/background", background),
        Route("/no-content", no_content),
        Route("/not-modified", not_modified),
        Route("/value-error", value_error),
        Route("/boom", boom),
        Route("/session-read", session_read),
    ]
    handlers: dict[Any, Any] = {500: error_page}
    app: Starlette = (
        FastAPI(routes=routes, exception_handlers=handlers, openapi_url=None)
        if build == "fastapi"
        else Starlette(routes=routes, exception_handlers=handlers)
    )
    if config is not None:
        app.add_middleware(WorkerMiddleware, config=config)
    # Added after the cache: outside it, as the docs place most middleware.
    app.add_middleware(MapValueErrors)
    app.add_middleware(SessionMiddleware, secret_key="fidelity-session-secret")
    return app


def fidelity_cases() -> list[Case]:
    return [
        Case("16 a background task that fails after the answer", "/background", 200,
             head=True, expect=lambda r: r.body == b"hello"),
        Case("17 204 No Content: no Content-Length", "/no-content", 204, head=True,
             expect=lambda r: r.values("content-length") == []),
        Case("17 304 keeps the app's length (its 200's)", "/not-modified", 304, head=True,
             expect=header_is("content-length", "11")),
        Case("18 a middleware outside the cache maps ValueError to 404", "/value-error", 404,
             head=True, expect=json_is({"missing": "no such report"})),
        Case("19 the app's own 500 handler", "/boom", 500, head=True,
             expect=lambda r: r.body == ERROR_PAGE.encode()),
        Case("20 Vary: Cookie from a session middleware outside", "/session-read", 200,
             head=True, expect=header_is("vary", "Cookie")),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build", ["fastapi", "starlette"])
async def test_replay_fidelity_after_the_answer_framing_and_outer_layers(
    build: str, backend: str, prefix: str, redis: Redis
) -> None:
    config = config_for(backend, prefix)
    bare, app = fidelity_app(build, None), fidelity_app(build, config)
    failures = await run_cases(bare, app, fidelity_cases(), lifespan=False)
    assert not failures, "\n".join(failures)


STATUSES = sorted(
    status.value for status in HTTPStatus if status >= 200 and status.value not in (101,)
)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_every_status_is_framed_as_http_requires(
    backend: str, prefix: str, redis: Redis
) -> None:
    """21: each status the app sends, served from the cache: RFC 9110 section 8.6."""

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        status = int(scope["path"].rsplit("/", 1)[1])
        body = b"" if status in (204, 304) else b"body of %d" % status
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    app = WorkerMiddleware(answer, config=config_for(backend, prefix))
    failures: list[str] = []
    async with serving(app, lifespan=False) as served:
        http = served.client()
        for status in STATUSES:
            await http.get(f"/status/{status}")
        await run_pending(app)
        for status in STATUSES:
            for method in ("GET", "HEAD"):
                got = await fetch(http, method, Case(str(status), f"/status/{status}", status))
                length = got.values("content-length")
                if status in (204, 304):
                    wanted: list[str] = []
                elif got.status == status:
                    wanted = [str(len(b"body of %d" % status))]
                else:
                    continue  # not served from the cache (hit-for-pass, ...): not ours
                if (
                    got.status != status
                    or length != wanted
                    or (got.body != b"" and (method == "HEAD" or status in (204, 304)))
                ):
                    failures.append(
                        f"[{method} {status}] {got.brief()}, content-length {length} "
                        f"(want {wanted}), {len(got.body)} body bytes"
                    )
    assert not failures, "\n".join(failures)
