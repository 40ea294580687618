"""Apps for tests/test_cli_discovery.py, importable as `tests.cli_apps:NAME` by the CLI."""

from __future__ import annotations

import os
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from asgi_worker import Config, WorkerMiddleware

from .conftest import REDIS_URL

# One prefix per test process, handed to the CLI's own processes; the tests delete its keys.
PREFIX = os.environ.get("AW_CLI_PREFIX") or f"awtest-cli-{uuid.uuid4().hex[:12]}"
config = Config(redis_url=REDIS_URL, prefix=PREFIX, ttl=60)
other_config = Config(redis_url=REDIS_URL, prefix=PREFIX + "-other", ttl=60)


async def answer(request: Request) -> Response:
    return PlainTextResponse(f"answered {request.url.path}")


def create_app() -> Starlette:
    """The middleware in a mounted sub-app: the worker must find it from the outer app."""
    sub = Starlette(routes=[Route("/{path:path}", answer)])
    sub.add_middleware(WorkerMiddleware, config=config)
    return Starlette(routes=[Mount("/sub", app=sub)])


app = create_app()
bare = Starlette(routes=[Route("/{path:path}", answer)])
