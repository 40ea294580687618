"""Small apps the tests put behind the middleware."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware


def make_app(config: Config, calls: Counter[str] | None = None) -> Starlette:
    """A Starlette app with the middleware; `calls` counts how often each path ran."""
    counted: Counter[str] = Counter() if calls is None else calls

    async def echo(request: Request) -> Response:
        counted[request.url.path] += 1
        return JSONResponse(
            {
                "path": request.url.path,
                "query": request.url.query,
                "host": request.headers.get("host"),
                "headers": sorted(request.headers.keys()),
                "startup": request.state.started,
            },
            headers={"x-app": "echo"},
        )

    async def stream(request: Request) -> Response:
        counted[request.url.path] += 1

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(5):
                await asyncio.sleep(0)
                yield f"chunk-{index};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    async def boom(request: Request) -> Response:
        counted[request.url.path] += 1
        raise RuntimeError("secret detail that must not reach a client")

    async def post(request: Request) -> Response:
        counted[request.url.path] += 1
        return PlainTextResponse("posted", status_code=201)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, bool]]:
        yield {"started": True}

    app = Starlette(
        routes=[
            Route("/echo", echo),
            Route("/stream", stream),
            Route("/boom", boom),
            Route("/post", post, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    app.add_middleware(WorkerMiddleware, config=config)
    return app
