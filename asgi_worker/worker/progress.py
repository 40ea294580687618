"""`report_progress`: a handler tells the client waiting on its job how far it got.

The job that replays a request sets a `ProgressReporter` for the replay's context (a
context variable: the app's task and the threads a sync view runs in inherit it). A
handler's `report_progress` finds it and keeps the value; the reporter writes the latest
value through the job's queue (`JobQueue.report`) at most every `WRITE_EVERY` seconds,
however often the handler reports, and never in the handler's way: a write is a task
of its own, and one that fails is logged at DEBUG and forgotten (progress is a hint).

Served directly (not in a replay), `report_progress` finds no reporter and returns: one
context-variable read.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable

from asgi_worker.core.progress import WRITE_EVERY, Progress, checked

logger = logging.getLogger("asgi_worker")

ProgressSink = Callable[[Progress, bool], Awaitable[None]]
"""Writes a job's progress (`ended`: its last); `JobQueue.report` bound to the job."""

_REPORTER: contextvars.ContextVar[ProgressReporter | None] = contextvars.ContextVar(
    "asgi_worker_progress", default=None
)


class ProgressReporter:
    """One job's progress: the latest value, written at most every `WRITE_EVERY` s."""

    def __init__(self, sink: ProgressSink, *, within: float) -> None:
        self._sink = sink
        self._within = within
        self._loop = asyncio.get_running_loop()
        self._latest: Progress | None = None
        self._written: Progress | None = None
        self._written_at = float("-inf")
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None
        self._ended = False

    def report(self, progress: Progress) -> None:
        """Keep `progress`; write it now, or when `WRITE_EVERY` has passed since the last.

        On the event loop's thread only (`report_progress_sync` hops to it).
        """
        if self._ended:
            return  # the job's answer is stored: a late report has no one to tell
        self._latest = progress
        if self._timer is None:
            wait = self._written_at + WRITE_EVERY - self._loop.time()
            self._timer = self._loop.call_later(max(wait, 0.0), self._write)

    def report_threadsafe(self, progress: Progress) -> None:
        """`report` from any thread (a sync view's)."""
        if _runs(self._loop):
            self.report(progress)
        else:
            self._loop.call_soon_threadsafe(self.report, progress)

    def _write(self) -> None:
        self._timer = None
        if self._ended or self._latest is None or self._latest is self._written:
            return
        if self._writing is not None and not self._writing.done():
            # The last write is still on its way (a slow link): the next one waits for it,
            # so that the writes arrive in order and at most one is in flight.
            self._timer = self._loop.call_later(WRITE_EVERY, self._write)
            return
        self._written, self._written_at = self._latest, self._loop.time()
        self._writing = self._loop.create_task(self._send(self._latest, ended=False))

    async def _send(self, progress: Progress, *, ended: bool) -> None:
        try:
            async with asyncio.timeout(self._within):
                await self._sink(progress, ended)
        except Exception as error:
            logger.debug("asgi-worker: a progress report was not written: %r", error)

    async def close(self) -> None:
        """The job's replay ended: write the last value as its last (if any was written)."""
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await self._writing
        # Only if a client may have seen progress: a job that never reported writes nothing.
        if self._written is not None and self._latest is not None:
            await self._send(self._latest, ended=True)

    def enter(self) -> contextvars.Token[ProgressReporter | None]:
        """Make this the reporter of the current context (the replay's); see `leave`."""
        return _REPORTER.set(self)

    @staticmethod
    def leave(token: contextvars.Token[ProgressReporter | None]) -> None:
        """Undo `enter`."""
        _REPORTER.reset(token)


def _runs(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the calling thread runs `loop` now."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def report_progress(
    done: float, total: float | None = None, message: str | None = None
) -> None:
    """Tell the client waiting on this request's job how far the handler got.

    `done` of `total` (`report_progress(3, 10)`: 30 %), or `done` alone as a fraction
    (`report_progress(0.3)`), with an optional short `message` ("reading page 3"). A
    client that asks for JSON gets it in each `202` (docs/progress.md); the dashboard
    shows it beside the running job.

    Call it as often as you like: at most four writes a second reach Redis, and a write
    never holds up the handler. Served directly, not in a replay, it does nothing.

    Raises:
        TypeError: `done` or `total` is not a number, or `message` not a str.
        ValueError: `done` or `total` is negative, infinite or NaN.
    """
    progress = checked(done, total, message, time.time())
    reporter = _REPORTER.get()
    if reporter is not None:
        reporter.report(progress)


def report_progress_sync(
    done: float, total: float | None = None, message: str | None = None
) -> None:
    """`report_progress` for a sync view (Django's, Flask-style code run in a thread).

    Callable from any thread that inherited the replay's context: Django and asgiref's
    `sync_to_async` pass it on. Same arguments, same errors.
    """
    progress = checked(done, total, message, time.time())
    reporter = _REPORTER.get()
    if reporter is not None:
        reporter.report_threadsafe(progress)
