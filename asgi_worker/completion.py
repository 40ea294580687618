"""`ReplayWorker`: an arq worker that stores a replay's result as it marks the job done.

A replay job ends in two writes: its commit (the entry, the indexes, the claim released)
and arq's bookkeeping (the job, its retry count and in-progress key deleted, the queue
entry removed), which arq sends in one MULTI/EXEC. `ReplayWorker` adds the commit script
to that transaction. A job then costs one round trip less (8-12 % more jobs/s, see
benchmarks/README.md), and its result and its end are sent together.

The job hands its commit over through a context variable that `ReplayWorker.run_job`
sets for the job's task: a job run by a plain arq `Worker` (`arq module.WorkerSettings`)
finds none, and commits itself, as it does when the queue is on another Redis than the
store.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from typing import Any

from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import to_ms
from arq.worker import Worker
from redis.exceptions import NoScriptError, RedisError

from .jobs import Commit
from .store import RedisStore, commit_outcome

logger = logging.getLogger("asgi_worker")


@dataclasses.dataclass(slots=True)
class _Slot:
    """Where one job leaves its commit for `ReplayWorker.finish_job`."""

    pending: _Pending | None = None


# A ContextVar, not an attribute: arq runs each job in its own task, and the job function
# in a task of its own below that; both see the slot set for them, and no other job's.
_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "asgi_worker_commit_slot", default=None
)


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    commit: Commit
    store: RedisStore
    timeout: float
    """Seconds for a commit sent on its own (`Config.redis_timeout`)."""

    def command(self) -> tuple[bytes | str | int, ...]:
        commit = self.commit
        return self.store.commit_command(commit.digest, commit.token, commit.started, commit.write)

    async def settle(self, reply: object) -> None:
        """Log what the commit's reply says; commit on its own if the script was missing."""
        commit = self.commit
        if isinstance(reply, NoScriptError):
            # Redis restarted, or no commit ran on it yet: `Store.commit` loads the script.
            # The job's end is already written; this commit lands just after it.
            try:
                async with asyncio.timeout(self.timeout):
                    committed = await commit.send(self.store)
            except (RedisError, OSError, TimeoutError) as error:
                commit.report_lost(error)
                return
        elif isinstance(reply, Exception):
            commit.report_lost(reply)
            return
        else:
            assert isinstance(reply, bytes | str)
            committed = commit_outcome(reply)
        commit.report(committed)


def hand_off(store: RedisStore, timeout: float, commit: Commit) -> bool:
    """Leave `commit` for the `ReplayWorker` running this job; False if there is none."""
    slot = _slot.get()
    if slot is None:
        return False
    slot.pending = _Pending(commit, store, timeout)
    return True


class ReplayWorker(Worker):
    """An arq `Worker` that commits each replay in the transaction that ends its job.

    Build it from `worker_settings()`: `ReplayWorker(**worker_settings(app, config))`;
    `asgi-worker worker` and `asgi_worker.testing` do. It runs any other arq job as
    arq's `Worker` does.
    """

    async def run_job(self, job_id: str, score: int) -> None:
        """See arq's `Worker.run_job`; gives the job a slot to leave its commit in."""
        token = _slot.set(_Slot())
        try:
            await super().run_job(job_id, score)
        finally:
            _slot.reset(token)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """See arq's `Worker.finish_job`; sends the job's commit in the same transaction."""
        slot = _slot.get()
        pending = slot.pending if slot is not None else None
        if slot is not None:
            slot.pending = None
        if pending is None or not finish or keep_in_progress is not None:
            # Nothing to add; or the job runs again and commits then (a pending commit is
            # dropped with its claim still held); or a cron job's end: arq's own finish.
            await super().finish_job(
                job_id,
                finish,
                result_data,
                result_timeout_s,
                keep_result_forever,
                incr_score,
                keep_in_progress,
            )
            return
        pool: Any = self.pool
        async with pool.pipeline(transaction=True) as transaction:
            # What arq's finish_job (0.26 to 0.28) sends for a finished job...
            if result_data:
                expire = None if keep_result_forever else result_timeout_s
                transaction.set(result_key_prefix + job_id, result_data, px=to_ms(expire))
            transaction.zrem(abort_jobs_ss, job_id)
            transaction.zrem(self.queue_name, job_id)
            transaction.delete(
                in_progress_key_prefix + job_id,
                retry_key_prefix + job_id,
                job_key_prefix + job_id,
            )
            # ...and the commit. An error in one command does not undo the others (Redis
            # has no rollback), so a failed commit cannot keep the job from ending.
            transaction.execute_command(*pending.command())
            replies = await transaction.execute(raise_on_error=False)
        await pending.settle(replies[-1])
        for reply in replies[:-1]:
            if isinstance(reply, Exception):
                raise reply  # as arq's own finish_job would
