"""Helpers for your own pytest suites: run the pending jobs inline, then assert on the 200.

```python
async def test_report(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        assert (await c.get("/report")).status_code == 202
        await run_pending(app)
        assert (await c.get("/report")).status_code == 200
```

With `memory://` or `inline_worker=True` the jobs already run as tasks: `run_pending`
waits for them. With the arq backend it runs a real arq worker in burst mode, in this
event loop, through the same app, until the queue is empty.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.types import ASGIApp

from .completion import ReplayWorker
from .config import Config
from .middleware import WorkerMiddleware
from .worker import worker_settings


async def run_pending(app: ASGIApp, config: Config | None = None) -> int:
    """Run every job enqueued so far (and any they lead to); return how many ran.

    `config` defaults to the one of the `WorkerMiddleware` inside `app`. The middleware
    is found once the app has served a request (Starlette builds its stack lazily).
    """
    middleware = find_middleware(app)
    if config is None:
        if middleware is None:
            raise LookupError(
                "no WorkerMiddleware found in the app (has it served a request yet?); "
                "pass config= explicitly"
            )
        config = middleware.config
    if config.in_process:
        return await middleware.drain() if middleware is not None else 0
    worker = ReplayWorker(**worker_settings(app, config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return int(worker.jobs_complete + worker.jobs_failed)


@asynccontextmanager
async def worker_running(app: ASGIApp, config: Config) -> AsyncIterator[None]:
    """Run jobs as they arrive, for the duration of the block.

    With the arq backend a real arq worker polls in this event loop; in-process
    backends already run their jobs as they arrive, so there is nothing to start.
    """
    if config.in_process:
        yield
        return
    worker = ReplayWorker(**worker_settings(app, config), handle_signals=False)
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        task.cancel()  # stop polling for new jobs
        await asyncio.gather(task, return_exceptions=True)
        # Let the jobs already running finish: arq's close() would cancel them.
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
        await worker.close()


def find_middleware(app: ASGIApp) -> WorkerMiddleware | None:
    """The `WorkerMiddleware` in an app's middleware chain, following `.app` links."""
    seen: set[int] = set()
    current: Any = app
    while current is not None and id(current) not in seen:
        if isinstance(current, WorkerMiddleware):
            return current
        seen.add(id(current))
        # Starlette and FastAPI keep the built chain in `middleware_stack`; middlewares
        # (Starlette's, ours and most others) keep the next app in `app`.
        current = getattr(current, "middleware_stack", None) or getattr(current, "app", None)
    return None
