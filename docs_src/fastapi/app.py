"""A slow report, served from Redis by WorkerMiddleware and computed by a worker."""

import asyncio

from asgi_worker import Config, WorkerMiddleware
from fastapi import FastAPI

config = Config(redis_url="redis://127.0.0.1:6379/0", prefix="example-fastapi", ttl=300)

app = FastAPI()
app.add_middleware(WorkerMiddleware, config=config)


@app.get("/reports/{year}")
async def report(year: int) -> dict[str, int]:
    """The report of `year`: run by the worker, never by the web app."""
    await asyncio.sleep(1)  # stands for the slow part: queries, a computation
    return {"year": year, "total": sum(range(year))}
