"""What the app does after its answer neither changes what is stored nor holds it up.

On every backend, with jobs running as they arrive (a real `ReplayWorker` for arq): a
Starlette `BackgroundTask` that fails, or that outlives `job_timeout`, leaves the app's
own answer stored and served, and the hit comes as soon as the answer is complete, not
when the task ends. The worker still waits for the task (up to `job_timeout`) and logs
how it ended.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware

from .helpers import backend_config, serve
from .stack import HIT

JOB_TIMEOUT = 1.5


class Finished(list[str]):
    """What the background tasks noted as they ended; `ended` is set at the first."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()

    def note(self, what: str) -> None:
        self.append(what)
        self.ended.set()


def app_with_background_work(config: Config, finished: Finished) -> Starlette:
    async def send_email() -> None:
        raise ConnectionError("smtp down")

    async def long_task() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            finished.note("long task ended")

    async def short_task() -> None:
        await asyncio.sleep(0.5)
        finished.note("short task done")

    async def failing(request: Request) -> Response:
        return PlainTextResponse("hello", background=BackgroundTask(send_email))

    async def outliving(request: Request) -> Response:
        return PlainTextResponse("still hello", background=BackgroundTask(long_task))

    async def slow_rest(request: Request) -> Response:
        return PlainTextResponse("quick answer", background=BackgroundTask(short_task))

    app = Starlette(
        routes=[
            Route("/failing", failing),
            Route("/outliving", outliving),
            Route("/slow-rest", slow_rest),
        ]
    )
    app.add_middleware(WorkerMiddleware, config=config)
    return app


class Logged(logging.Handler):
    """Sets `seen` once a record of the `asgi_worker` logger holds `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def hit_after_202(
    http: httpx.AsyncClient, path: str, *, within: float
) -> tuple[float, httpx.Response]:
    """GET `path` (a 202), then until a hit; returns the seconds it took and the hit."""
    began = time.monotonic()
    first = await http.get(path)
    assert first.status_code == 202
    while True:
        answer = await http.get(path)
        if answer.status_code != 202:
            return time.monotonic() - began, answer
        assert time.monotonic() - began < within, f"{path}: no hit within {within} s"
        await asyncio.sleep(0.02)


async def test_a_failing_background_task_leaves_the_answer_stored(
    kind: str, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config = backend_config(kind, config, job_timeout=JOB_TIMEOUT)
    finished = Finished()
    app = app_with_background_work(config, finished)
    async with serve(app, worker=config) as http:
        _, hit = await hit_after_202(http, "/failing", within=5)
    assert hit.status_code == 200
    assert hit.headers["cache-status"] == HIT
    assert hit.text == "hello"
    assert "the app raised after its answer (its answer is stored)" in caplog.text
    assert "ConnectionError: smtp down" in caplog.text


async def test_work_outliving_job_timeout_is_cancelled_and_the_answer_stands(
    kind: str, config: Config
) -> None:
    config = backend_config(kind, config, job_timeout=JOB_TIMEOUT)
    finished = Finished()
    app = app_with_background_work(config, finished)
    logged = Logged("was still running after its answer at job_timeout=1.5s")
    logging.getLogger("asgi_worker").addHandler(logged)
    try:
        async with serve(app, worker=config) as http:
            seconds, hit = await hit_after_202(http, "/outliving", within=5)
            assert hit.text == "still hello"
            assert seconds < JOB_TIMEOUT  # served before the task was cancelled
            await asyncio.wait_for(logged.seen.wait(), JOB_TIMEOUT + 3)
    finally:
        logging.getLogger("asgi_worker").removeHandler(logged)
    assert finished == ["long task ended"]  # cancelled at job_timeout, not left running


async def test_the_hit_does_not_wait_for_the_work_after_the_answer(
    kind: str, config: Config
) -> None:
    config = backend_config(kind, config, job_timeout=5.0)
    finished = Finished()
    app = app_with_background_work(config, finished)
    async with serve(app, worker=config) as http:
        seconds, hit = await hit_after_202(http, "/slow-rest", within=5)
        assert hit.text == "quick answer"
        # The task takes 0.5 s; the answer was committed before it ended.
        assert seconds < 0.45, f"the hit took {seconds:.3f} s: the commit waited for the task"
        assert finished == []
        await asyncio.wait_for(finished.ended.wait(), 3)
    assert finished == ["short task done"]  # and the worker let it finish
