"""`RecentJob`: the latest jobs' path, duration and outcome, for the ops dashboard.

With `Config.dashboard_counts` on, each job ended is kept: in the process with
`memory://` (`RecentJobs`), else pushed to a capped list on the queue's Redis
(`RedisKeys.recent_jobs`) where every worker's jobs meet (`push_jobs`, `read_jobs`).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from asgi_worker.core.keys import RedisKeys

KEPT = 200
"""Jobs kept, newest first (the list is trimmed to this at each write)."""


@dataclass(frozen=True, slots=True)
class RecentJob:
    """One job that ended."""

    path: str
    seconds: float
    """The whole job: replay and commit."""
    outcome: str
    """One of `observer.JOB_OUTCOMES`."""
    at: float
    """When it ended, in Unix seconds (the worker's clock)."""

    def encoded(self) -> bytes:
        """As a list item: compact JSON."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decoded(cls, raw: bytes) -> RecentJob | None:
        """The job `encoded` wrote; None for an item it did not write."""
        try:
            item = json.loads(raw)
            return cls(
                str(item["path"]), float(item["seconds"]), str(item["outcome"]), float(item["at"])
            )
        except (ValueError, KeyError, TypeError):
            return None


class RecentJobs:
    """The process's latest `KEPT` jobs (`memory://`), newest first."""

    def __init__(self) -> None:
        self._jobs: deque[RecentJob] = deque(maxlen=KEPT)

    def add(self, job: RecentJob) -> None:
        """Keep `job` as the newest."""
        self._jobs.appendleft(job)

    def latest(self, limit: int) -> list[RecentJob]:
        """Up to `limit` jobs, newest first."""
        return list(self._jobs)[:limit]


def push_jobs(pipeline: Any, keys: RedisKeys, jobs: list[RecentJob]) -> None:
    """Queue on `pipeline` the push of `jobs` (oldest first), and the trim to `KEPT`.

    Written in batches (about once a second), so the trim costs a batch, not each job.
    """
    if not jobs:
        return
    key = keys.recent_jobs()
    pipeline.lpush(key, *(job.encoded() for job in jobs))
    pipeline.ltrim(key, 0, KEPT - 1)


async def read_jobs(redis: Any, keys: RedisKeys, limit: int) -> list[RecentJob]:
    """Up to `limit` of the jobs on `redis`'s list, newest first."""
    raw = await redis.lrange(keys.recent_jobs(), 0, max(0, min(limit, KEPT) - 1))
    return [job for item in raw if (job := RecentJob.decoded(item)) is not None]
