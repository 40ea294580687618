"""How a `ReplayWorker` takes jobs off arq's queue, and sleeps when there are none.

arq's own worker polls: every `poll_delay` it reads the due jobs and races every other
worker for each one with a WATCH/MULTI transaction. Its cost per job grows with the
number of workers, and an idle worker still sends a hundred commands a second at a
10 ms poll. Here a worker takes jobs with one script (`queue_scripts.TAKE`), which reads
only what it takes, and an idle worker blocks on the queue's wake list, which each
enqueue pushes a token on (`queue_scripts.ENQUEUE`). The wait and the take go in one
round trip: a pipeline of BLPOP and the take, which Redis runs the moment the wait ends.
A worker wakes for a new job within that round trip, and when nothing comes, looks at the
queue every `IDLE_LOOK_EVERY` seconds (jobs enqueued by other means than `ArqQueue`, say
arq's `enqueue_job`, push no token).

The take also reads each job it takes as arq's `Worker.run_job` would first read it (the
job, its try counted, whether it was aborted). `arq_worker.PreReadPool` hands that to
`run_job` in place of its own read: a job starts with no round trip after the one that
took it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.exceptions import NoScriptError

from asgi_worker.backends.redis.queue_scripts import TAKE
from asgi_worker.backends.redis.script_runner import Script
from asgi_worker.core.keys import wake_key

logger = logging.getLogger("asgi_worker")

IDLE_LOOK_EVERY = 3.0
"""Seconds an idle worker sleeps at most before it looks at the queue again unwoken.

Each look is four commands as Redis counts them (BLPOP, the take, the clock and the
one read inside it): 1.3 a second per idle worker."""


RETRY_KEY_TTL = 88400
"""Seconds arq's `run_job` keeps a job's try count (the take counts it as arq does)."""


@dataclass(frozen=True, slots=True)
class TakenJob:
    """A job one take got, and what arq's `run_job` reads of it first."""

    job_id: str
    score: int
    """Its score when taken (the take rescores it to its lease's end)."""
    payload: bytes | None
    """The job as arq stored it; None if it expired."""
    tries: int
    """This try's number: the job's retry count, counted by the take."""
    aborted: bool
    """Whether it was aborted (arq's `Job.abort`); only read with `allow_abort_jobs`."""


@dataclass(frozen=True, slots=True)
class Taken:
    """What one take got: the jobs, and when the next job is due."""

    jobs: list[TakenJob]
    due_in_ms: int | None
    """In how many ms the earliest job left in the queue is due (0: now), if any."""


class JobTaker:
    """Takes due jobs for one worker, after waiting for an enqueue's wake token if asked."""

    def __init__(
        self, pool: ArqRedis, queue_name: str, *, read_aborts: bool = False, alive: str = ""
    ) -> None:
        """`alive`: the worker's heartbeat key (heartbeat.py), "" if it keeps none.

        Each job taken is marked in progress under it (and the time of the take); with
        none, with arq's own value.
        """
        self.pool = pool
        self._queue_name = queue_name
        self._abort_set = abort_jobs_ss if read_aborts else ""
        self._alive = alive or "1"
        self._wake_key = wake_key(queue_name)
        self._script = Script(pool, TAKE)

    async def take(self, most: int, *, lease_ms: int, wait: float = 0.0, now_ms: int = 0) -> Taken:
        """Take up to `most` due jobs: each is this worker's until its lease ends.

        With `wait`, first wait up to that many seconds for a wake token (an enqueue);
        the take runs when the wait ends, in the same round trip. `now_ms` is for tests:
        0 takes what is due by Redis's clock.
        """
        arguments: list[str | int] = [
            now_ms,
            most,
            lease_ms,
            in_progress_key_prefix,
            job_key_prefix,
            retry_key_prefix,
            RETRY_KEY_TTL,
            self._abort_set,
            self._alive,
        ]
        if wait <= 0:
            reply = await self._script([self._queue_name], arguments)
        else:
            reply = await self._wait_then_take(wait, arguments)
        flat, due_in = reply
        jobs = [
            TakenJob(
                flat[i].decode(), int(flat[i + 1]), flat[i + 2], int(flat[i + 3]), flat[i + 4] == 1
            )
            for i in range(0, len(flat), 5)
        ]
        return Taken(jobs, None if due_in is None else int(due_in))

    async def _wait_then_take(self, wait: float, arguments: list[str | int]) -> Any:
        # A plain pipeline: Redis runs the take right after the BLPOP returns, on the same
        # connection, with no round trip between. (`Script.command`: redis-py's pipeline
        # of a registered script would ask SCRIPT EXISTS first, a round trip more.)
        # BLPOP takes a timeout in seconds with a resolution of 1 ms; 0 would block for
        # ever, so a wait is never shorter than that.
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.blpop([self._wake_key], timeout=max(0.001, wait))  # type: ignore[arg-type]
            pipe.execute_command(*self._script.command([self._queue_name], arguments))
            _, reply = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError):
            # Redis restarted, or never ran the take: the script call loads it and takes
            # now, without another wait (the wait is over, and a job may have come).
            return await self._script([self._queue_name], arguments)
        if isinstance(reply, Exception):
            raise reply
        return reply
