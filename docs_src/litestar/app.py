"""A slow report, served from Redis by WorkerMiddleware and computed by a worker."""

import asyncio

from asgi_worker import Config, WorkerMiddleware
from litestar import Litestar, get
from litestar.middleware import DefineMiddleware

config = Config(redis_url="redis://127.0.0.1:6379/0", prefix="example-litestar", ttl=300)


@get("/reports/{year:int}")
async def report(year: int) -> dict[str, int]:
    """The report of `year`: run by the worker, never by the web app."""
    await asyncio.sleep(1)  # stands for the slow part: queries, a computation
    return {"year": year, "total": sum(range(year))}


app = Litestar(
    route_handlers=[report],
    middleware=[DefineMiddleware(WorkerMiddleware, config=config)],
)
