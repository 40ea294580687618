"""A worker's heartbeat: a key on the queue's Redis that lives while the worker does.

`ReplayWorker` marks each job it takes as in progress under its heartbeat key (the
in-progress key's value names it, and when the job was taken: `queue_scripts.TAKE`), and
keeps the key alive for `queue.ALIVE_FOR` seconds, renewed every `BEAT_EVERY` s while it
has jobs to run. A web process that finds a job in progress under a heartbeat that has
expired, taken longer ago than a heartbeat lives, knows the job's worker is gone, killed
or frozen, and queues the request again (`queue.ArqQueue.lost`), where it waited for the
job's lease to end (75 s by default: arq's in-progress lease, `job_timeout` + 15 s).

The beats come from a thread of their own, with an event loop and a Redis client of
their own: an app that holds the worker's event loop for longer than `ALIVE_FOR` (CPU
work in an `async def` endpoint) does not make its worker look dead, and its job is not
run a second time. A worker that is alive but cannot reach Redis looks dead, and its
job runs elsewhere; its own commit is then refused (its claim is another job's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from asgi_worker.backends.redis.queue import ALIVE_FOR
from asgi_worker.backends.redis.retries import REDIS_ERRORS, Throttle, brief

logger = logging.getLogger("asgi_worker")

BEAT_EVERY = 1.0
"""Seconds between two beats of a worker with jobs to run (an idle one sends none)."""


class Heartbeat:
    """Keeps one key alive from a thread of its own, while `busy()` says there is work.

    Args:
        key: The heartbeat key (`queue.alive_key`).
        client: Makes the thread's Redis client (called in the thread, on its loop).
        busy: Whether the worker has jobs to run now; read from the thread.
    """

    def __init__(self, key: str, client: Callable[[], Redis], busy: Callable[[], bool]) -> None:
        self.key = key
        self._client = client
        self._busy = busy
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._trouble = Throttle(every=60.0)

    def start(self) -> None:
        """Start beating; returns once the thread's loop runs."""
        thread = threading.Thread(
            target=asyncio.run, args=(self._run(),), name="asgi-worker heartbeat", daemon=True
        )
        thread.start()
        self._thread = thread
        self._started.wait()

    async def stop(self) -> None:
        """Stop beating and delete the key: no job is in progress under it any more.

        Returns once the thread has ended (a beat on its way, then the delete: a few
        seconds at most).
        """
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        self._thread = None
        with contextlib.suppress(RuntimeError):  # its loop has ended already
            loop.call_soon_threadsafe(stopping.set)
        await asyncio.to_thread(thread.join)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        stopping = self._stopping = asyncio.Event()
        self._started.set()
        client = self._client()
        ms = round(ALIVE_FOR * 1000)
        try:
            while not stopping.is_set():
                if self._busy():
                    await self._send(client.set(self.key, b"1", px=ms))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), BEAT_EVERY)
            await self._send(client.delete(self.key))
        finally:
            await client.aclose(close_connection_pool=True)

    async def _send(self, command: Awaitable[object]) -> None:
        # A beat lost now and then costs nothing: the key outlives several.
        try:
            async with asyncio.timeout(ALIVE_FOR / 2):
                await command
        except REDIS_ERRORS as error:
            self._trouble.log(
                logging.WARNING,
                "asgi-worker: the worker's heartbeat %s was not sent (%s): a job of this "
                "worker that it misses for %g s may be run again by another worker",
                self.key,
                brief(error),
                ALIVE_FOR,
            )
