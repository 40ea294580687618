"""The app the Sentinel tests serve with uvicorn and replay in `asgi-worker worker`.

Configured only from `ASGI_WORKER_*` variables, as `tests/e2e_app.py` is, but with no
Redis of its own (that app's lifespan client takes plain `redis://` URLs only): each
answer says which process made it, and nothing else.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware

config = Config.from_env()


async def item(request: Request) -> Response:
    """One cacheable answer per URL."""
    return JSONResponse({"query": request.url.query, "pid": os.getpid()})


async def health(request: Request) -> Response:
    """Readiness probe; excluded from the worker via ASGI_WORKER_EXCLUDE."""
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/item", item), Route("/health", health)])
app.add_middleware(WorkerMiddleware, config=config)
