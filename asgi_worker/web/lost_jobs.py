"""Claims whose job is lost: noticed by the requests that find them, and taken over.

A claim says that one job of its request exists. The job can be lost while its claim
holds: its key evicted by a queue Redis under a `maxmemory-policy` other than
`noeviction`, lost in a failover or a restart, or in progress under a worker that was
killed. Its URL then answered `202` until the claim's lease ran out (90 s by default).

A lookup that finds the key claimed by another request returns the holder's token and
how long it has held the claim (`Lookup.holder`, `Lookup.held_for`), at no extra cost.
Once the claim is older than the grace its enqueue has (`redis_timeout`, within which
the claiming request sends it, and a margin), the request asks the queue whether that
job is still queued or running (`JobQueue.lost`: one script on the queue's Redis). A
lost job is removed from the queue there, so that no worker runs it later; the request
then takes its claim over with a compare-and-set (`Store.take_over`: only while the lost
job's token holds it) and enqueues a job, as a request that claimed does. Of requests
that do this at once, in any process, one takes the claim; the others answer as before.

Each process asks at most once per `CHECK_EVERY` seconds per key, so a flood of `202`s
on one URL costs one round trip more per second, not one per request. Hits never ask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from redis.exceptions import RedisError

from asgi_worker.backends.base import JobQueue, Store
from asgi_worker.backends.redis.retries import Throttle, brief
from asgi_worker.core.keys import RedisKeys

GRACE_MARGIN = 0.5
"""Seconds a claim is given past `redis_timeout` to have its job enqueued."""
CHECK_EVERY = 1.0
"""Seconds between two checks of one key's job, in one process."""
MOST_KEYS = 10_000
"""Keys whose last check a process remembers; beyond, the oldest are forgotten."""


class LostJobs:
    """When to check a claim's job, and the take-over of a claim whose job is lost.

    One per middleware: it remembers when each key was last checked (at most
    `most` keys, and none checked longer than `every` ago).
    """

    def __init__(
        self,
        keys: RedisKeys,
        *,
        grace: float,
        every: float = CHECK_EVERY,
        most: int = MOST_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._grace = grace
        self._every = every
        self._most = most
        self._clock = clock
        self._checked: dict[str, float] = {}  # digest -> when, oldest first
        self._trouble = Throttle()

    def due(self, digest: str, held_for: float) -> bool:
        """Whether to check the job of a claim held for `held_for` s now; if so, noted."""
        if held_for < self._grace:
            return False
        now = self._clock()
        checked = self._checked
        last = checked.pop(digest, None)
        if last is not None and now - last < self._every:
            checked[digest] = last  # put back: still the newest check of this key
            return False
        checked[digest] = now
        # Forget the checks that no longer hold anything back, and the oldest beyond
        # the bound: the dict is in order of the checks, so these are at its front.
        while len(checked) > self._most or now - next(iter(checked.values())) >= self._every:
            del checked[next(iter(checked))]
        return True

    async def take_over(
        self, store: Store, queue: JobQueue, digest: str, holder: str, token: str, path: str
    ) -> float | None:
        """The claim for `token`, if the job of the claim's `holder` is lost.

        Returns the claim time, as `Lookup.claimed_at`, for the caller to enqueue; None
        if the job is not lost, or another request took the claim first. A Redis error
        is logged (a WARNING per 10 s at most) and counts as not lost: the request
        answers as it would have, and a later one checks again.
        """
        job_id = self._keys.job_id(digest, holder)
        try:
            if not await queue.lost(job_id):
                return None
            return await store.take_over(digest, holder, token, path)
        except (RedisError, OSError) as error:
            self._trouble.log(
                logging.WARNING,
                "asgi-worker: could not check whether job %s is lost: %s",
                job_id,
                brief(error),
            )
            return None
