"""A slow report, served from Redis by WorkerMiddleware and computed by a worker."""

import asyncio

from asgi_worker import Config, WorkerMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

config = Config(redis_url="redis://127.0.0.1:6379/0", prefix="example-starlette", ttl=300)


async def report(request: Request) -> JSONResponse:
    """The report of a year: run by the worker, never by the web app."""
    year: int = request.path_params["year"]
    await asyncio.sleep(1)  # stands for the slow part: queries, a computation
    return JSONResponse({"year": year, "total": sum(range(year))})


app = Starlette(
    routes=[Route("/reports/{year:int}", report)],
    middleware=[Middleware(WorkerMiddleware, config=config)],
)
