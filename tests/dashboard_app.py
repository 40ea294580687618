"""The app the dashboard's end-to-end tests serve: a slow endpoint, the dashboard at /ops.

Configured from `ASGI_WORKER_*` variables, as `tests/e2e_app.py` is, so uvicorn, the worker
and `asgi-worker dashboard` agree on the cache; the token is ASGI_WORKER_DASHBOARD_TOKEN.
The dashboard is excluded from the cache (`ASGI_WORKER_EXCLUDE=/health,/ops*`).
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from asgi_worker import Config, WorkerMiddleware, report_progress
from asgi_worker.core.config import DASHBOARD_TOKEN_VARIABLE
from asgi_worker.dashboard import create_dashboard

config = Config.from_env()

MAX_SLEEP = 30.0


async def sleep(request: Request) -> Response:
    """Sleeps `?seconds=` (at most `MAX_SLEEP`), then answers its path and query."""
    seconds = min(float(request.query_params.get("seconds", "0")), MAX_SLEEP)
    await asyncio.sleep(seconds)
    return JSONResponse({"path": request.url.path, "query": request.url.query})


async def steps(request: Request) -> Response:
    """`?steps=N` steps of `?every=S` seconds (at most `MAX_SLEEP` in all), each reported."""
    count = max(1, int(request.query_params.get("steps", "10")))
    every = min(float(request.query_params.get("every", "0.5")), MAX_SLEEP / count)
    for step in range(count):
        await report_progress(step, count, f"step {step + 1} of {count}")
        await asyncio.sleep(every)
    return JSONResponse({"path": request.url.path, "steps": count})


async def health(request: Request) -> Response:
    """Readiness probe (excluded from the cache)."""
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/sleep/{name}", sleep),
        Route("/steps/{name}", steps),
        Route("/health", health),
        Mount(
            "/ops", create_dashboard(config, token=os.environ.get(DASHBOARD_TOKEN_VARIABLE, "-"))
        ),
    ]
)
app.add_middleware(WorkerMiddleware, config=config)
