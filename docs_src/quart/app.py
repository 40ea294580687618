"""A slow report, served from Redis by WorkerMiddleware and computed by a worker."""

import asyncio

from asgi_worker import Config, WorkerMiddleware
from quart import Quart

config = Config(redis_url="redis://127.0.0.1:6379/0", prefix="example-quart", ttl=300)

app = Quart(__name__)
# Around Quart's ASGI app, not the Quart object: serve and give the worker `app` itself.
app.asgi_app = WorkerMiddleware(app.asgi_app, config=config)


@app.get("/reports/<int:year>")
async def report(year: int) -> dict[str, int]:
    """The report of `year`: run by the worker, never by the web app."""
    await asyncio.sleep(1)  # stands for the slow part: queries, a computation
    return {"year": year, "total": sum(range(year))}
