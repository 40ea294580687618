"""One set of endpoints in each framework, for the replay-fidelity suite (test_conformance.py).

Every factory builds the same endpoints, either bare (`config=None`) or with
`WorkerMiddleware` placed the way docs/stored-response.md documents for that framework. The test
compares the bare app's answer with the cached answer of the app behind the middleware.

| path               | what the handler does                                             |
| ------------------ | ----------------------------------------------------------------- |
| /items/{name}      | JSON: the (unicode) path parameter, the repeated `tag` query param |
| /state             | reads the app's state (FastAPI/Starlette/Litestar `request.app`)  |
| /missing           | the handler raises the framework's 404                            |
| /boom              | the handler raises RuntimeError                                   |
| /redirect          | redirects to /items/target (URL built by the framework)           |
| /stream            | a streaming response of several chunks                            |
| /binary            | 256 KiB of random bytes (fixed seed)                              |
| /multi             | two `x-multi` response headers                                    |
| /lifespan          | reads a resource created at lifespan startup                      |
| /where             | the base URL and the URL of /where, as text                       |
| /vary-star         | a response with `Vary: *`                                         |
| /text              | a text long enough for GZipMiddleware                             |
| /session           | writes the session (Starlette/FastAPI, with SessionMiddleware)    |

Django serves the async views at these paths and the sync views under `/sync`.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import quart
from fastapi import FastAPI, Query
from litestar import HttpMethod, Litestar, get, route
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Stream
from litestar.response.base import ASGIResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from asgi_worker import Config, WorkerMiddleware

GREETING = "h\u00e9llo \u2603"  # the app state value: "héllo ☃"
RESOURCE = "pool:conformance"  # what the lifespan resource answers
CHUNKS = [f"chunk-{index};".encode() for index in range(4)]
BINARY = random.Random(20240607).randbytes(256 * 1024)
LONG_TEXT = "conformance \u2713 " * 100  # well over GZipMiddleware's 500-byte minimum
ORIGIN = "https://client.example"
TRUSTED_HOST = "testserver"


@dataclass(frozen=True)
class Resource:
    """Something an app opens at lifespan startup (think: a database pool)."""

    name: str


@dataclass(frozen=True)
class Framework:
    """How one framework is built, and which cases it can express."""

    name: str
    build: Callable[[Config | None], ASGIApp]
    redirect_status: int
    base: str = ""
    """Path prefix of every endpoint (Django's sync views live under /sync)."""
    lifespan: bool = True
    """The app speaks the ASGI lifespan protocol (Django does not)."""
    repeated_headers: bool = True
    """The framework can send one response header twice."""
    router_before_middleware: bool = False
    """Routing runs outside the middleware (Litestar applies app middleware per route),
    so an unknown path is answered by the router and never reaches the cache."""


# --- FastAPI ---------------------------------------------------------------------------


def fastapi_app(config: Config | None, around: Around | None = None) -> ASGIApp:
    app = FastAPI(lifespan=_starlette_lifespan, openapi_url=None)
    app.state.g = GREETING

    @app.get("/items/{name}")
    async def items(name: str, tag: Annotated[list[str] | None, Query()] = None) -> Any:
        return {"name": name, "tags": tag or [], "greeting": GREETING}

    @app.get("/state")
    async def state(request: Request) -> Any:
        return {"g": request.app.state.g}

    @app.get("/missing")
    async def missing() -> Any:
        raise HTTPException(status_code=404, detail="no such thing")

    @app.get("/boom")
    async def boom() -> Any:
        raise RuntimeError("boom")

    @app.get("/redirect")
    async def redirect(request: Request) -> Response:
        return RedirectResponse(str(request.url_for("items", name="target")))

    @app.get("/stream")
    async def stream() -> Response:
        return StreamingResponse(_chunks(), media_type="text/plain")

    @app.get("/binary")
    async def binary() -> Response:
        return Response(BINARY, media_type="application/octet-stream")

    @app.get("/multi")
    async def multi() -> Response:
        return _multi()

    @app.get("/lifespan")
    async def lifespan(request: Request) -> Any:
        return {"resource": request.state.resource.name}

    @app.get("/where", name="where")
    async def where(request: Request) -> Response:
        return PlainTextResponse(f"{request.base_url} {request.url_for('where')}")

    @app.get("/vary-star")
    async def vary_star() -> Response:
        return PlainTextResponse("varies", headers={"vary": "*"})

    @app.get("/text")
    async def text() -> Response:
        return PlainTextResponse(LONG_TEXT)

    @app.get("/session")
    async def session(request: Request) -> Any:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return {"visits": request.session["visits"]}

    _add_middlewares(app, config, around)
    return app


# --- Starlette -------------------------------------------------------------------------


def starlette_app(config: Config | None, around: Around | None = None) -> ASGIApp:
    async def items(request: Request) -> Response:
        return JSONResponse(
            {
                "name": request.path_params["name"],
                "tags": request.query_params.getlist("tag"),
                "greeting": GREETING,
            }
        )

    async def state(request: Request) -> Response:
        return JSONResponse({"g": request.app.state.g})

    async def missing(request: Request) -> Response:
        raise HTTPException(status_code=404, detail="no such thing")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    async def redirect(request: Request) -> Response:
        return RedirectResponse(str(request.url_for("items", name="target")))

    async def stream(request: Request) -> Response:
        return StreamingResponse(_chunks(), media_type="text/plain")

    async def binary(request: Request) -> Response:
        return Response(BINARY, media_type="application/octet-stream")

    async def multi(request: Request) -> Response:
        return _multi()

    async def lifespan(request: Request) -> Response:
        return JSONResponse({"resource": request.state.resource.name})

    async def where(request: Request) -> Response:
        return PlainTextResponse(f"{request.base_url} {request.url_for('where')}")

    async def vary_star(request: Request) -> Response:
        return PlainTextResponse("varies", headers={"vary": "*"})

    async def text(request: Request) -> Response:
        return PlainTextResponse(LONG_TEXT)

    async def session(request: Request) -> Response:
        request.session["visits"] = request.session.get("visits", 0) + 1
        return JSONResponse({"visits": request.session["visits"]})

    app = Starlette(
        routes=[
            Route("/items/{name}", items, name="items"),
            Route("/state", state),
            Route("/missing", missing),
            Route("/boom", boom),
            Route("/redirect", redirect),
            Route("/stream", stream),
            Route("/binary", binary),
            Route("/multi", multi),
            Route("/lifespan", lifespan),
            Route("/where", where, name="where"),
            Route("/vary-star", vary_star),
            Route("/text", text),
            Route("/session", session),
        ],
        lifespan=_starlette_lifespan,
    )
    app.state.g = GREETING
    _add_middlewares(app, config, around)
    return app


@asynccontextmanager
async def _starlette_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    yield {"resource": Resource(RESOURCE)}


async def _chunks() -> AsyncIterator[bytes]:
    for chunk in CHUNKS:
        yield chunk


def _multi() -> Response:
    response = PlainTextResponse("two x-multi headers")
    response.headers.append("x-multi", "first")
    response.headers.append("x-multi", "second")
    return response


# --- Middlewares around WorkerMiddleware (Starlette and FastAPI) -------------------------


@dataclass(frozen=True)
class Around:
    """One Starlette middleware, added inside or outside `WorkerMiddleware`."""

    kind: str
    side: str  # "inside" or "outside"


AROUND: dict[str, tuple[type[Any], dict[str, Any]]] = {
    # Both add `Vary: Origin` (the header the issue saw twice, "Origin, Origin"); the
    # first answers `Access-Control-Allow-Origin: *`, the second echoes the origin.
    "cors-any": (CORSMiddleware, {"allow_origins": ["*"]}),
    "cors-listed": (CORSMiddleware, {"allow_origins": [ORIGIN]}),
    "gzip": (GZipMiddleware, {}),
    "trusted-host": (TrustedHostMiddleware, {"allowed_hosts": [TRUSTED_HOST]}),
    "session": (SessionMiddleware, {"secret_key": "conformance-session-secret"}),
}


def _add_middlewares(app: Starlette, config: Config | None, around: Around | None) -> None:
    """Starlette's add_middleware: a middleware added later runs outside (before) it."""
    if around is not None and around.side == "inside":
        _add_around(app, around)
    if config is not None:
        app.add_middleware(WorkerMiddleware, config=config)
    if around is not None and around.side == "outside":
        _add_around(app, around)


def _add_around(app: Starlette, around: Around) -> None:
    cls, options = AROUND[around.kind]
    app.add_middleware(cls, **options)


def mounted(build: Callable[..., ASGIApp], config: Config | None) -> ASGIApp:
    """An outer app of the same framework with the app (and its middleware) at /sub."""
    sub = build(config)
    if build is fastapi_app:
        return FastAPI(routes=[Mount("/sub", app=sub)], openapi_url=None)
    return Starlette(routes=[Mount("/sub", app=sub)])


# --- Litestar --------------------------------------------------------------------------


def litestar_app(config: Config | None) -> ASGIApp:
    # GET and HEAD: Litestar answers HEAD only on routes that declare it.
    # `item`, not `name`: `request.url_for(name, **path_parameters)` takes `name` itself.
    @route("/items/{item:str}", http_method=[HttpMethod.GET, HttpMethod.HEAD], name="items")
    async def items(item: FromPath[str], tag: FromQuery[list[str] | None] = None) -> dict[str, Any]:
        return {"name": item, "tags": tag or [], "greeting": GREETING}

    @get("/state")
    async def state(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return {"g": request.app.state.g}

    @get("/missing")
    async def missing() -> None:
        raise NotFoundException("no such thing")

    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @get("/redirect")
    async def redirect(request: LitestarRequest[Any, Any, Any]) -> Redirect:
        return Redirect(path=request.url_for("items", item="target"))

    @get("/stream")
    async def stream() -> Stream:
        return Stream(_chunks(), media_type="text/plain")

    @get("/binary")
    async def binary() -> LitestarResponse[bytes]:
        return LitestarResponse(BINARY, media_type="application/octet-stream")

    @get("/multi")
    async def multi() -> ASGIResponse:
        # Litestar's Response keeps headers in a dict; its ASGIResponse takes pairs.
        return ASGIResponse(
            body=b"two x-multi headers",
            media_type="text/plain",
            headers=[("x-multi", "first"), ("x-multi", "second")],
        )

    @get("/lifespan")
    async def lifespan(request: LitestarRequest[Any, Any, Any]) -> dict[str, Any]:
        return {"resource": request.app.state.resource.name}

    @get("/where", name="where")
    async def where(request: LitestarRequest[Any, Any, Any]) -> str:
        return f"{request.base_url} {request.url_for('where')}"

    @get("/vary-star")
    async def vary_star() -> LitestarResponse[str]:
        return LitestarResponse("varies", media_type="text/plain", headers={"vary": "*"})

    @asynccontextmanager
    async def open_resource(app: Litestar) -> AsyncIterator[None]:
        app.state.resource = Resource(RESOURCE)
        yield

    handlers = [items, state, missing, boom, redirect, stream, binary, multi, lifespan, where]
    return Litestar(
        route_handlers=[*handlers, vary_star],
        middleware=[DefineMiddleware(WorkerMiddleware, config=config)] if config else [],
        state=State({"g": GREETING}),
        lifespan=[open_resource],
        openapi_config=None,
    )


# --- Quart -----------------------------------------------------------------------------


def quart_app(config: Config | None) -> ASGIApp:
    app = quart.Quart("conformance")
    app.config["GREETING"] = GREETING

    @app.before_serving
    async def open_resource() -> None:
        app.extensions["resource"] = Resource(RESOURCE)

    @app.get("/items/<name>")
    async def items(name: str) -> Any:
        return {"name": name, "tags": quart.request.args.getlist("tag"), "greeting": GREETING}

    @app.get("/state")
    async def state() -> Any:
        return {"g": quart.current_app.config["GREETING"]}

    @app.get("/missing")
    async def missing() -> Any:
        quart.abort(404)

    @app.get("/boom")
    async def boom() -> Any:
        raise RuntimeError("boom")

    @app.get("/redirect")
    async def to_target() -> Any:
        return quart.redirect(quart.url_for("items", name="target"))

    @app.get("/stream")
    async def stream() -> Any:
        return _chunks(), 200, {"content-type": "text/plain"}

    @app.get("/binary")
    async def binary() -> Any:
        return quart.Response(BINARY, mimetype="application/octet-stream")

    @app.get("/multi")
    async def multi() -> Any:
        response = quart.Response("two x-multi headers", mimetype="text/plain")
        response.headers.add("x-multi", "first")
        response.headers.add("x-multi", "second")
        return response

    @app.get("/lifespan")
    async def lifespan() -> Any:
        return {"resource": quart.current_app.extensions["resource"].name}

    @app.get("/where")
    async def where() -> Any:
        return f"{quart.request.root_url} {quart.url_for('where', _external=True)}"

    @app.get("/vary-star")
    async def vary_star() -> Any:
        return "varies", 200, {"vary": "*"}

    if config is not None:
        app.asgi_app = WorkerMiddleware(app.asgi_app, config=config)  # type: ignore[method-assign]
    return app


# --- Django ----------------------------------------------------------------------------

DJANGO_URLCONF = "tests.conformance_urls"


def _django_setup() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=DJANGO_URLCONF,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
            DATABASES={},
            SECRET_KEY="conformance-not-secret",
            USE_TZ=True,
            CONFORMANCE_GREETING=GREETING,
        )
        django.setup()
    # Settings are per process: fail clearly if another module configured them first.
    assert settings.ROOT_URLCONF == DJANGO_URLCONF, f"Django configured by {settings.ROOT_URLCONF}"


def django_app(config: Config | None) -> ASGIApp:
    _django_setup()
    from django.core.asgi import get_asgi_application

    application = get_asgi_application()
    if config is None:
        return application
    return WorkerMiddleware(application, config=config)


def django_views(asynchronous: bool) -> dict[str, Callable[..., Any]]:
    """The Django views, async or sync; the URL names live in tests/conformance_urls.py."""
    from django.conf import settings
    from django.http import (
        Http404,
        HttpRequest,
        HttpResponse,
        HttpResponseRedirect,
        JsonResponse,
        StreamingHttpResponse,
    )
    from django.urls import reverse

    def name_of(request: HttpRequest, view: str) -> str:
        match = request.resolver_match
        assert match is not None
        return f"{match.namespace}:{view}"

    def items(request: HttpRequest, name: str) -> HttpResponse:
        payload = {"name": name, "tags": request.GET.getlist("tag"), "greeting": GREETING}
        return JsonResponse(payload, json_dumps_params={"ensure_ascii": False})

    def state(request: HttpRequest) -> HttpResponse:
        return JsonResponse({"g": settings.CONFORMANCE_GREETING})

    def missing(request: HttpRequest) -> HttpResponse:
        raise Http404("no such thing")

    def boom(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("boom")

    def redirect(request: HttpRequest) -> HttpResponse:
        return HttpResponseRedirect(reverse(name_of(request, "items"), args=["target"]))

    def sync_chunks() -> Iterator[bytes]:
        yield from CHUNKS

    def stream(request: HttpRequest) -> HttpResponse:
        chunks = _chunks() if asynchronous else sync_chunks()
        return StreamingHttpResponse(chunks, content_type="text/plain")  # type: ignore[return-value]

    def binary(request: HttpRequest) -> HttpResponse:
        return HttpResponse(BINARY, content_type="application/octet-stream")

    def where(request: HttpRequest) -> HttpResponse:
        base = request.build_absolute_uri(request.META["SCRIPT_NAME"] + "/")
        url = request.build_absolute_uri(reverse(name_of(request, "where")))
        return HttpResponse(f"{base} {url}", content_type="text/plain")

    def vary_star(request: HttpRequest) -> HttpResponse:
        response = HttpResponse("varies", content_type="text/plain")
        response["Vary"] = "*"
        return response

    views: dict[str, Callable[..., Any]] = {
        "items": items,
        "state": state,
        "missing": missing,
        "boom": boom,
        "redirect": redirect,
        "stream": stream,
        "binary": binary,
        "where": where,
        "vary_star": vary_star,
    }
    if not asynchronous:
        return views
    return {name: _as_async(view) for name, view in views.items()}


def _as_async(view: Callable[..., Any]) -> Callable[..., Any]:
    """The same view as a coroutine function: Django then runs it in the event loop."""

    async def async_view(*args: Any, **kwargs: Any) -> Any:
        return view(*args, **kwargs)

    async_view.__name__ = view.__name__
    return async_view


# --- The list the tests iterate over -----------------------------------------------------

FRAMEWORKS = [
    Framework("fastapi", fastapi_app, redirect_status=307),
    Framework("starlette", starlette_app, redirect_status=307),
    Framework("litestar", litestar_app, redirect_status=302, router_before_middleware=True),
    Framework("quart", quart_app, redirect_status=302),
    Framework(
        "django-async", django_app, redirect_status=302, lifespan=False, repeated_headers=False
    ),
    Framework(
        "django-sync",
        django_app,
        redirect_status=302,
        base="/sync",
        lifespan=False,
        repeated_headers=False,
    ),
]
MOUNTABLE = [framework for framework in FRAMEWORKS if framework.name in {"fastapi", "starlette"}]
