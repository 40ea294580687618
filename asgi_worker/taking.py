"""How a `ReplayWorker` takes jobs off arq's queue, and sleeps when there are none.

arq's own worker polls: every `poll_delay` it reads the due jobs and races every other
worker for each one with a WATCH/MULTI transaction. Its cost per job grows with the
number of workers, and an idle worker still sends a hundred commands a second at a
10 ms poll. Here a worker takes jobs with one script (`queue_scripts.TAKE`), which reads
only what it takes, and an idle worker blocks on the queue's wake list, which each
enqueue pushes a token on (`queue_scripts.ENQUEUE`). It wakes for a new job within a
round trip, and when nothing comes, looks at the queue every `IDLE_LOOK_EVERY` seconds
(jobs enqueued by other means than `ArqQueue`, say arq's `enqueue_job`, push no token).
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from .queue import wake_key
from .queue_scripts import TAKE

IDLE_LOOK_EVERY = 2.0
"""Seconds an idle worker sleeps at most before it looks at the queue again unwoken.

With the take, one wait: about one command a second per idle worker."""


@dataclass(frozen=True, slots=True)
class Taken:
    """What one take got: the jobs, with their scores, and when the next job is due."""

    jobs: list[tuple[str, int]]
    next_due_ms: int | None
    """When the earliest job left in the queue is due (ms since the epoch), if any."""


class JobTaker:
    """Takes due jobs for one worker, and waits for the next enqueue's wake token."""

    def __init__(self, pool: ArqRedis, queue_name: str) -> None:
        self.pool = pool
        self._queue_name = queue_name
        self._wake_key = wake_key(queue_name)
        self._take = pool.register_script(TAKE)

    async def take(self, most: int, *, now_ms: int, lease_ms: int) -> Taken:
        """Take up to `most` due jobs: each is this worker's until its lease ends."""
        reply = await self._take(
            [self._queue_name], [now_ms, most, lease_ms, in_progress_key_prefix]
        )
        pairs, next_due = reply
        jobs = [(pairs[i].decode(), int(pairs[i + 1])) for i in range(0, len(pairs), 2)]
        return Taken(jobs, None if next_due is None else int(float(next_due)))

    async def wait(self, seconds: float) -> bool:
        """Block until an enqueue's wake token comes, or `seconds` pass; True if woken."""
        # BLPOP takes a timeout in seconds with a resolution of 1 ms; 0 would block for
        # ever, so a wait is never shorter than that.
        # (redis-py types the timeout as int; Redis 6 and later take a float.)
        timeout: Any = max(0.001, seconds)
        woken = await cast(Awaitable[Any], self.pool.blpop([self._wake_key], timeout=timeout))
        return woken is not None
