"""Apps for tests/test_worker_logging.py, imported only by its worker subprocesses.

Building a Litestar app configures the root logger (Litestar's default `LoggingConfig`):
that is what the tests are about, so each app is built only when a worker asks for it by
name (the module's `__getattr__`), and never in the test process. The Config comes from
`AW_LOG_REDIS_URL` and `AW_LOG_PREFIX`.

    asgi-worker worker tests.logging_apps:litestar_app
    arq tests.logging_apps.StarletteSettings       (or LitestarSettings)
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware, worker_settings

config = Config(
    redis_url=os.environ["AW_LOG_REDIS_URL"], prefix=os.environ["AW_LOG_PREFIX"], ttl=60
)


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def build_litestar() -> Any:
    from litestar import Litestar, MediaType, get
    from litestar.middleware import DefineMiddleware

    @get("/hello", media_type=MediaType.TEXT)
    async def litestar_hello() -> str:
        return "hello"

    middleware = [DefineMiddleware(WorkerMiddleware, config=config)]
    return Litestar(route_handlers=[litestar_hello], middleware=middleware)


def build_starlette() -> Starlette:
    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


BUILDS = {
    "litestar_app": build_litestar,
    "starlette_app": build_starlette,
    "LitestarSettings": lambda: worker_settings(build_litestar()),
    "StarletteSettings": lambda: worker_settings(build_starlette()),
}


def __getattr__(name: str) -> Any:
    if name in BUILDS:
        return BUILDS[name]()
    raise AttributeError(name)
