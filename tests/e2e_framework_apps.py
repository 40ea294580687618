"""The same small app in each framework, served and replayed by `tests/test_e2e_frameworks.py`.

For every framework there are two module-level apps built by one factory:
`<framework>_app`, with `WorkerMiddleware` placed the way that framework's users place it,
and `<framework>_bare`, the very same endpoints without it (the reference the test compares
the stored responses with). The endpoints:

    /health          readiness probe (excluded from the worker)
    /json?q=...      JSON echoing a (unicode) query parameter, with a response header
    /binary          a body of every byte value
    /items/{id}      an item; an unknown id is a 404 raised by the handler
    /stream          a streamed response in several chunks
    /state           a value the app's lifespan (startup) put in its state (not in Django)

Django adds sync views of some under /sync/. The Config comes from `AW_E2E_REDIS_URL` and
`AW_E2E_PREFIX`, not from `ASGI_WORKER_*`: the worker is started without `--config` (and
without `ASGI_WORKER_*` variables) and must find the Config in the app it is given.

Import this module only in subprocesses: it configures Django's settings at import.
"""

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.urls import path
from fastapi import FastAPI, HTTPException
from litestar import Litestar, MediaType, get
from litestar import Response as LitestarResponse
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.response import Stream
from quart import Quart, abort, current_app, jsonify
from quart import Response as QuartResponse
from quart import request as quart_request
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware

config = Config(
    redis_url=os.environ.get("AW_E2E_REDIS_URL", "redis://127.0.0.1:6379/0"),
    prefix=os.environ.get("AW_E2E_PREFIX", "aw-e2e-frameworks"),
    ttl=60,
    retry_after=1,
    exclude=("/health",),
)

GREETING = "set at startup ✓"
TEXT = "naïve café ✓ 日本語"
ITEMS = {1: {"id": 1, "name": "widget ✓"}}
BINARY = bytes(range(256)) * 64
STREAM_CHUNKS = tuple(f"chunk {number}: ✓\n".encode() for number in range(5))
STREAM_TYPE = "text/plain; charset=utf-8"


def _payload(framework: str, q: str, variant: str = "async") -> dict[str, Any]:
    return {"framework": framework, "variant": variant, "q": q, "text": TEXT, "n": [1, 2.5, None]}


async def _chunks() -> AsyncIterator[bytes]:
    for chunk in STREAM_CHUNKS:
        yield chunk
        await asyncio.sleep(0.01)  # really separate body messages


# ----- Starlette and FastAPI: app.add_middleware ---------------------------------------


@asynccontextmanager
async def _starlette_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    yield {"greeting": GREETING}  # handed to every request as request.state


def _starlette(with_worker: bool) -> Starlette:
    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def json_view(request: Request) -> Response:
        payload = _payload("starlette", request.query_params.get("q", ""))
        return JSONResponse(payload, headers={"x-e2e-framework": "starlette"})

    async def binary(request: Request) -> Response:
        return Response(BINARY, media_type="application/octet-stream")

    async def item(request: Request) -> Response:
        found = ITEMS.get(request.path_params["item_id"])
        if found is None:
            raise StarletteHTTPException(404, detail="no such item")
        return JSONResponse(found)

    async def stream(request: Request) -> Response:
        return StreamingResponse(_chunks(), media_type=STREAM_TYPE)

    async def state(request: Request) -> Response:
        return JSONResponse({"greeting": request.state.greeting})

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/json", json_view),
            Route("/binary", binary),
            Route("/items/{item_id:int}", item),
            Route("/stream", stream),
            Route("/state", state),
        ],
        lifespan=_starlette_lifespan,
    )
    if with_worker:
        app.add_middleware(WorkerMiddleware, config=config)
    return app


def _fastapi(with_worker: bool) -> FastAPI:
    app = FastAPI(lifespan=_starlette_lifespan)

    @app.get("/health", response_class=PlainTextResponse)
    async def health() -> str:
        return "ok"

    @app.get("/json")
    async def json_view(response: Response, q: str = "") -> dict[str, Any]:
        response.headers["x-e2e-framework"] = "fastapi"
        return _payload("fastapi", q)

    @app.get("/binary")
    async def binary() -> Response:
        return Response(BINARY, media_type="application/octet-stream")

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        if item_id not in ITEMS:
            raise HTTPException(404, detail="no such item")
        return ITEMS[item_id]

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(_chunks(), media_type=STREAM_TYPE)

    @app.get("/state")
    async def state(request: Request) -> dict[str, str]:
        return {"greeting": request.state.greeting}

    if with_worker:
        app.add_middleware(WorkerMiddleware, config=config)
    return app


# ----- Litestar: a DefineMiddleware in the app's middleware list -----------------------


def _litestar_startup(app: Litestar) -> None:
    app.state.greeting = GREETING


def _litestar(with_worker: bool) -> Litestar:
    # Handlers are made per app: the two apps must not share handler objects.
    @get("/health", media_type=MediaType.TEXT)
    async def health() -> str:
        return "ok"

    @get("/json")
    async def json_view(q: str = "") -> LitestarResponse[dict[str, Any]]:
        return LitestarResponse(_payload("litestar", q), headers={"x-e2e-framework": "litestar"})

    @get("/binary", media_type="application/octet-stream")
    async def binary() -> bytes:
        return BINARY

    @get("/items/{item_id:int}")
    async def item(item_id: int) -> dict[str, Any]:
        if item_id not in ITEMS:
            raise NotFoundException(detail="no such item")
        return ITEMS[item_id]

    @get("/stream")
    async def stream() -> Stream:
        return Stream(_chunks(), media_type=MediaType.TEXT)  # Litestar adds the charset

    @get("/state")
    async def state_view(state: State) -> dict[str, str]:
        return {"greeting": state.greeting}

    middleware = [DefineMiddleware(WorkerMiddleware, config=config)] if with_worker else []
    return Litestar(
        route_handlers=[health, json_view, binary, item, stream, state_view],
        middleware=middleware,
        on_startup=[_litestar_startup],
    )


# ----- Quart: WorkerMiddleware around app.asgi_app; the worker is given the Quart app ---


def _quart(with_worker: bool) -> Quart:
    app = Quart(__name__)
    app.json.ensure_ascii = False  # type: ignore[attr-defined]  # raw UTF-8, as the others

    @app.before_serving
    async def startup() -> None:
        app.config["E2E_GREETING"] = GREETING

    @app.get("/health")
    async def health() -> str:
        return "ok"

    @app.get("/json")
    async def json_view() -> Any:
        payload = _payload("quart", quart_request.args.get("q", ""))
        return jsonify(payload), 200, {"x-e2e-framework": "quart"}

    @app.get("/binary")
    async def binary() -> QuartResponse:
        return QuartResponse(BINARY, mimetype="application/octet-stream")

    @app.get("/items/<int:item_id>")
    async def item(item_id: int) -> Any:
        if item_id not in ITEMS:
            abort(404)
        return jsonify(ITEMS[item_id])

    @app.get("/stream")
    async def stream() -> Any:
        return _chunks(), 200, {"content-type": STREAM_TYPE}

    @app.get("/state")
    async def state() -> Any:
        return jsonify({"greeting": current_app.config["E2E_GREETING"]})

    if with_worker:
        app.asgi_app = WorkerMiddleware(app.asgi_app, config=config)
    return app


fastapi_app = _fastapi(with_worker=True)
fastapi_bare = _fastapi(with_worker=False)
starlette_app = _starlette(with_worker=True)
starlette_bare = _starlette(with_worker=False)
litestar_app = _litestar(with_worker=True)
litestar_bare = _litestar(with_worker=False)
quart_app = _quart(with_worker=True)
quart_bare = _quart(with_worker=False)


# ----- Django: WorkerMiddleware around get_asgi_application(); no lifespan -------------

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="e2e-framework-apps-not-a-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=[],
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
    )


def _django_json(request: HttpRequest, variant: str) -> HttpResponse:
    return JsonResponse(
        _payload("django", request.GET.get("q", ""), variant),
        headers={"x-e2e-framework": "django"},
        json_dumps_params={"ensure_ascii": False},
    )


def _django_item(item_id: int) -> HttpResponse:
    if item_id not in ITEMS:
        raise Http404("no such item")
    return JsonResponse(ITEMS[item_id])


def _sync_chunks() -> Iterator[bytes]:
    yield from STREAM_CHUNKS


async def django_health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


async def django_json(request: HttpRequest) -> HttpResponse:
    return _django_json(request, "async")


def django_sync_json(request: HttpRequest) -> HttpResponse:
    return _django_json(request, "sync")


async def django_binary(request: HttpRequest) -> HttpResponse:
    return HttpResponse(BINARY, content_type="application/octet-stream")


async def django_item(request: HttpRequest, item_id: int) -> HttpResponse:
    return _django_item(item_id)


def django_sync_item(request: HttpRequest, item_id: int) -> HttpResponse:
    return _django_item(item_id)


async def django_stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(_chunks(), content_type=STREAM_TYPE)


def django_sync_stream(request: HttpRequest) -> StreamingHttpResponse:
    # A sync iterator: Django consumes it in a thread under ASGI (and warns about it).
    return StreamingHttpResponse(_sync_chunks(), content_type=STREAM_TYPE)


urlpatterns = [
    path("health", django_health),
    path("json", django_json),
    path("binary", django_binary),
    path("items/<int:item_id>", django_item),
    path("stream", django_stream),
    path("sync/json", django_sync_json),
    path("sync/items/<int:item_id>", django_sync_item),
    path("sync/stream", django_sync_stream),
]

django_app = WorkerMiddleware(get_asgi_application(), config=config)
django_bare = get_asgi_application()
