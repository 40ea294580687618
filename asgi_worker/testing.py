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

from starlette.types import ASGIApp

from asgi_worker.core.config import Config
from asgi_worker.core.discovery import find_all, find_config
from asgi_worker.core.discovery import find_middleware as _find
from asgi_worker.web.middleware import WorkerMiddleware
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.settings import worker_settings

__all__ = ["find_middleware", "run_pending", "worker_running"]


async def run_pending(app: ASGIApp, config: Config | None = None) -> int:
    """Run every job enqueued so far, and any they lead to, until none is left.

    With `memory://` or `inline_worker` the jobs already run as tasks: this waits for
    them, also where they run on another event loop (Starlette's `TestClient` serves the
    app on one of its own). With the arq backend it runs a real `ReplayWorker` in burst
    mode, in this event loop, until the queue is empty.

    Args:
        app: The app you serve (replays enter at its top).
        config: By default the one of the `WorkerMiddleware` inside `app`.

    Returns:
        How many jobs ran: in-process, those that ended since the last `run_pending`
        (or since the app started), whether they ended before this call or during it.
    """
    if config is None:
        config = find_config(app)
    if config.in_process:
        # Each middleware instance runs its own jobs (Litestar builds one per route).
        drained = [await found.middleware.drain() for found in find_all(app, WorkerMiddleware)]
        return sum(drained)
    worker = ReplayWorker(**worker_settings(app, config), burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return int(worker.jobs_complete + worker.jobs_failed)


@asynccontextmanager
async def worker_running(app: ASGIApp, config: Config | None = None) -> AsyncIterator[None]:
    """Run jobs as they arrive, for the duration of the `async with` block.

    With the arq backend a real `ReplayWorker` runs in this event loop; when the block
    ends it takes no new job and lets the running ones finish. In-process backends
    already run their jobs as they arrive, so there is nothing to start.

    Args:
        app: The app you serve (replays enter at its top).
        config: By default the one of the `WorkerMiddleware` inside `app`.
    """
    if config is None:
        config = find_config(app)
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
    """The outermost `WorkerMiddleware` in `app`, or None.

    Found through middleware stacks, mounts and the frameworks' wrappers (Starlette,
    FastAPI, Litestar, Quart): for a test to reach the middleware's `store` or `drain`.
    """
    return _find(app, WorkerMiddleware)
