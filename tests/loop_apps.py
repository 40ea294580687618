"""A small app for tests/test_event_loops.py, and its servers: the middleware on a config."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware


async def report(request: Request) -> Response:
    return PlainTextResponse("report")


def report_app(config: Config) -> Starlette:
    """`GET /report` answers `report`, behind `WorkerMiddleware` with `config`."""
    app = Starlette(routes=[Route("/report", report, methods=["GET"])])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


app = report_app(Config(redis_url="memory://"))
