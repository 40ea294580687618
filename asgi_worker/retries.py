"""Redis errors the worker rides out: which pass, retries, and a log line not once a job.

Which errors may pass (`transient`), a step tried again until it goes through within a
bound (`retried`), and a log that says so once, not once a job (`Throttle`).

An error is *transient* when the same command may succeed a little later: the connection
was lost or reset, no answer came in time, or Redis refused the command for a state that
passes. A Redis over its `maxmemory` with `maxmemory-policy noeviction` refuses every
write that could take memory (OOM) and every command queued in a MULTI, so that the EXEC
fails (EXECABORT); the others are a failed background save (MISCONF), a script running
too long (BUSY), a Redis loading its data (LOADING), a replica (READONLY) or one that
lost its master (MASTERDOWN), too few replicas for a write (NOREPLICAS), and a Cluster
in the middle of a change (TRYAGAIN, CLUSTERDOWN). Any other error (a key of the wrong
type, a script error) comes back however often the command is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import (
    ClusterDownError,
    ExecAbortError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("asgi_worker")

T = TypeVar("T")

OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, TimeoutError)
"""What a command raises when Redis is away, frozen, or not the master (a replica)."""

REDIS_ERRORS = (RedisError, OSError, TimeoutError)
"""Whatever a Redis command can raise: an error reply, or no reply."""

_PASSING = (*OUTAGE_ERRORS, OutOfMemoryError, ExecAbortError, TryAgainError, ClusterDownError)

# Error replies redis-py has no class for, by their code (the reply's first word).
_PASSING_CODES = frozenset({"MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS"})

FIRST_DELAY = 0.05
"""Seconds before a step's first retry; each retry waits twice as long as the one before."""
MAX_DELAY = 0.4
"""The longest wait between two tries of a step."""


# How redis-py words the error of one command of a pipeline: `Command # <n> (<the whole
# command>) of pipeline caused error: <the error's args>`.
_OF_PIPELINE = " of pipeline caused error: "
# The most of a pipeline's command a log line shows: a commit's holds the stored body.
_COMMAND_SHOWN = 80


def transient(error: BaseException) -> bool:
    """Whether the command that met `error` may go through if sent again a little later."""
    if isinstance(error, _PASSING):
        return True
    if not isinstance(error, ResponseError):
        return False
    # redis-py keeps the code of a reply it has no class for at the start of its message
    # (for a command of a pipeline, in the args it adds to its own words).
    reply = str(error).rpartition(_OF_PIPELINE)[2].lstrip("(\"'")
    return reply.split(" ", 1)[0] in _PASSING_CODES


def brief(error: BaseException) -> str:
    """`error` for a log line, as `repr` shows it, a pipeline's command cut short."""
    command, found, rest = str(error).partition(_OF_PIPELINE)
    if not found or len(command) <= _COMMAND_SHOWN:
        return repr(error)
    text = f"{command[:_COMMAND_SHOWN]} ...){found}{rest}"
    return f"{type(error).__name__}({text!r})"


async def retried(
    step: Callable[[], Awaitable[T]], *, within: float, each: float | None = None
) -> T:
    """`step()`; after a transient error, again (after 0.05 s, 0.1 s, ... up to 0.4 s).

    Gives up `within` seconds after the first try began: a try is cut off there, and none
    begins after it. Raises the last error then, or at once an error that is not
    transient. `each`: a try is also cut off (a timeout, transient) after that long, so
    that one stalled connection does not take the whole of `within`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = FIRST_DELAY
    while True:
        try:
            ends = deadline if each is None else min(deadline, loop.time() + each)
            async with asyncio.timeout_at(ends):
                return await step()
        except REDIS_ERRORS as error:
            if not transient(error) or loop.time() + delay >= deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(2 * delay, MAX_DELAY)


class Throttle:
    """Logs one kind of trouble at once, then at most one line every `every` seconds.

    A worker meets the same Redis trouble in every job: its first line is logged, the
    next ones are counted, and the next line logged says how many it stands for.
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._quiet_until = float("-inf")
        self._held = 0

    def log(self, level: int, message: str, *args: object) -> None:
        """Log `message % args` at `level`, unless a line was logged less than `every` ago."""
        now = time.monotonic()
        if now < self._quiet_until:
            self._held += 1
            return
        if self._held:
            message += " (and %d more like it since the line before, not logged)"
            args = (*args, self._held)
            self._held = 0
        self._quiet_until = now + self.every
        logger.log(level, message, *args)
