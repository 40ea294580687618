"""arq behind one door: `ReplayWorker`, the only code that leans on arq's internals.

It subclasses arq's `Worker` and overrides private parts of it (`_poll_iteration`, the
end of a job, the first read of `run_job` through `PreReadPool`), which arq does not
promise to keep: the worker's tests run against every arq release the package accepts
(`nox -s arq`), and `test_arq_worker.py` pins the signatures it overrides.

`ReplayWorker` stores a replay's result as it marks the job done.

A replay job ends in two writes: its commit (the entry, the indexes, the claim released)
and arq's bookkeeping (the job, its retry count and in-progress key deleted, the queue
entry removed), which arq sends in one MULTI/EXEC. `ReplayWorker` adds the commit script
to that transaction. A job then costs one round trip less (8-12 % more jobs/s, see
benchmarks/README.md), and its result and its end are sent together.

The job hands its commit over through a context variable that `ReplayWorker.run_job`
sets for the job's task: a job run by a plain arq `Worker` (`arq module.WorkerSettings`)
finds none, and commits itself, as it does when the queue is on another Redis than the
store.

`ReplayWorker` takes jobs its own way (see `job_taker`): one script takes the due jobs it
has slots for, where arq's poll raced every other worker for every due job, and an idle
worker sleeps on the queue's wake list instead of polling every `poll_delay`. So a job's
cost does not grow with the number of workers, an idle worker sends about a command a
second, and a job starts within a round trip of its enqueue.

`ReplayWorker` also never dies of a Redis error: arq's poll loop ends the worker on the
first error that outlives a command's retries; here the worker waits until Redis is back
(`outage.Patience`: one log line when it is lost, one every 10 s while it stays away,
one when it is back) and goes on. A Redis that answers but refuses what the worker asks
(over its `maxmemory` with `noeviction`, it refuses the take's writes and every command of
a MULTI) is waited out the same way, the worker's own look at the queue being the probe.
At start, a Redis that cannot be reached is one log line, then `RedisUnreachable` (the
`asgi-worker worker` command exits 69), or the same wait with `wait_for_redis=True`.

A job's end is tried again after an error that may pass, for up to `redis_timeout`; past
that, the job is ended without MULTI (what a full Redis still takes) and its claim given
up, so that the next request enqueues it again at once (`ReplayWorker.finish_job`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import secrets
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.utils import to_ms
from arq.worker import Worker
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from asgi_worker.backends.redis.clients import client_url
from asgi_worker.backends.redis.retries import (
    OUTAGE_ERRORS,
    REDIS_ERRORS,
    Throttle,
    brief,
    retried,
    transient,
)
from asgi_worker.backends.redis.store import RedisStore, commit_outcome
from asgi_worker.core.keys import alive_key
from asgi_worker.worker.heartbeat import Heartbeat
from asgi_worker.worker.job import Commit
from asgi_worker.worker.job_taker import IDLE_LOOK_EVERY, RETRY_KEY_TTL, JobTaker, TakenJob
from asgi_worker.worker.outage import Patience, RedisUnreachable, check_master

logger = logging.getLogger("asgi_worker")

# A poll iteration stuck this many probe timeouts (a connect timeout and a second: 3 s
# by default) is an outage.
_ITERATION_TIMEOUT_FACTOR = 3


@dataclasses.dataclass(slots=True)
class _Slot:
    """What `ReplayWorker.finish_job` needs of one job: its score, and its commit."""

    score: int
    """The job's score when it was taken (the take rescores it to its lease's end)."""
    read: TakenJob | None = None
    """What the take read for arq's `run_job`, until that pipeline is answered."""
    pending: _Pending | None = None
    after: Callable[[], Awaitable[None]] | None = None
    """The job's `Commit.after`: awaited once arq has ended the job (and sent the commit)."""

    def read_used(self) -> None:
        self.read = None


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

    def commands(self) -> list[tuple[bytes | str | int, ...]]:
        """The commit's commands; its script's reply is the last one."""
        commit = self.commit
        return [
            self.store.due_command(commit.write),
            self.store.commit_command(commit.digest, commit.token, commit.started, commit.write),
        ]

    async def settle(self, reply: object) -> None:
        """Log what the commit's reply says; commit on its own if the script was missing.

        The job's end is already written: a commit sent on its own lands just after it.
        """
        commit = self.commit
        if not isinstance(reply, Exception):
            assert isinstance(reply, bytes | str)
            commit.report(commit_outcome(reply))
        elif isinstance(reply, NoScriptError) or transient(reply):
            # Redis restarted, or no commit ran on it yet (`Store.commit` loads the
            # script), or an error that may pass: the commit on its own, retried.
            await commit.send_and_report(self.store, self.timeout)
        else:
            await self.give_up(reply)  # a key of the wrong type: it would fail again

    async def give_up(self, error: BaseException) -> None:
        """The commit failed for good: log it; release the claim if the error may pass."""
        await self.commit.give_up(self.store, error, self.timeout)


def hand_off(store: RedisStore, timeout: float, commit: Commit) -> bool:
    """Leave `commit` for the `ReplayWorker` running this job; False if there is none."""
    slot = _slot.get()
    if slot is None or commit.write.tags or commit.write.body is not None:
        # A tagged commit indexes its tags in steps of their own first, and a body stored
        # apart is written in steps of its own first (store.py).
        return False
    slot.pending = _Pending(commit, store, timeout)
    slot.after = commit.after
    return True


class ReplayWorker(Worker):
    """The arq `Worker` that `asgi-worker worker` runs: it replays requests and stores them.

    Build it from `worker_settings()`:

    ```python
    worker = ReplayWorker(**worker_settings(app))
    await worker.async_run()  # or worker.run(), which runs its own event loop
    ```

    Where it differs from arq's `Worker`: each replay's response is stored in the
    transaction that marks its job done (one round trip less per job); one script takes
    the jobs it has slots for, and an idle worker is woken by each enqueue instead of
    polling; and a Redis outage, or a Redis that refuses the worker's commands (over its
    `maxmemory` with `noeviction`), is waited out (logged as it starts, every 10 s, and
    as it ends) instead of ending the worker. Any other arq job runs as in arq's `Worker`.

    Args:
        *args: arq `Worker` arguments, as `worker_settings()` gives them.
        wait_for_redis: At start, wait for a Redis that cannot be reached, as for an
            outage later on, instead of raising `RedisUnreachable` after one log line.
        **kwargs: arq `Worker` keyword arguments, as `worker_settings()` gives them,
            and any other (`burst=True`, `handle_signals=False`, ...).
    """

    def __init__(self, *args: Any, wait_for_redis: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_for_redis = wait_for_redis
        self._reached_redis = False
        self._patience_for: tuple[object, Patience] | None = None  # (its pool, it)
        self._taker_of: JobTaker | None = None
        self._heartbeat: Heartbeat | None = None
        self._slot_freed = asyncio.Event()
        self._waiting_for_slot = False
        self._failed_runs: list[BaseException] = []
        self._trouble = Throttle()  # jobs whose end Redis did not take
        self._wait = 0.0  # before the next look (see `_look_at_queue`)
        # arq's poll loop sleeps what is left of `poll_delay` after each iteration; ours
        # sleeps inside the iteration (until woken), so the loop must not add to it.
        self._burst_poll = self.poll_delay_s
        self.poll_delay_s = 0.0

    async def main(self) -> None:
        """See arq's `Worker.main`; first makes sure Redis is there (or waits for it)."""
        if self._pool is not None:  # else arq's create_pool retries and fails by itself
            patience = self._patience()
            error = await patience.probe(self._check_redis)
            if error is not None:
                if not self.wait_for_redis:
                    logger.error("asgi-worker: cannot reach Redis at %s: %r", patience.where, error)
                    raise RedisUnreachable(f"cannot reach Redis at {patience.where}: {error!r}")
                await patience.wait(self._check_redis, error, starting=True)
        self._reached_redis = True
        self._start_heartbeat()
        await super().main()

    def _start_heartbeat(self) -> None:
        """Keep a heartbeat key alive while this worker runs jobs (see heartbeat.py).

        Only on a pool made by `connections.redis_client` (`worker_settings()`'s), which
        can make a client for the heartbeat's thread; on another, jobs are marked in
        progress as arq marks them, and a job whose worker died waits out its lease.
        """
        pool = self._pool
        another = getattr(pool.connection_pool, "another", None) if pool is not None else None
        if another is None or self._heartbeat is not None:
            return
        key = alive_key(self.queue_name, secrets.token_hex(6))
        heartbeat = Heartbeat(key, another, lambda: self.job_counter > 0)
        heartbeat.start()
        self._heartbeat = heartbeat

    async def _poll_iteration(self) -> None:
        # arq's iteration reads every due job and races other workers for each; ours waits
        # for work, then takes jobs with one script (see `job_taker`). arq's poll loop
        # around it sleeps only what is left of `poll_delay`: nothing, after a wait.
        # An outage is waited out, where arq's loop would end the worker. Past its wait,
        # a look takes milliseconds: one that takes longer is stuck on a Redis that
        # accepts and never answers (the queue's client has no read timeout).
        patience = self._patience()
        limit = _ITERATION_TIMEOUT_FACTOR * patience.probe_timeout
        wait, self._wait = self._wait, 0.0
        try:
            async with asyncio.timeout(wait + limit) as deadline:
                self._wait = await self._look_at_queue(wait)
        except OUTAGE_ERRORS as error:
            stuck = RedisTimeoutError(f"no answer within {limit:g} s past its wait")
            reason = stuck if deadline.expired() else error
            await patience.wait(self._check_redis, reason, starting=False)
        except REDIS_ERRORS as error:
            # Redis answers, but refuses the look (over its maxmemory with noeviction, the
            # take's writes): the next look that goes through ends the wait.
            await patience.wait(self._look_again, error, starting=False, refused=True)

    async def _look_again(self) -> None:
        """A look at the queue that does not wait for work: `Patience`'s probe."""
        self._wait = await self._look_at_queue(0.0)

    async def _look_at_queue(self, wait: float) -> float:
        """Wait up to `wait` s for work, take the due jobs there are slots for, tend the rest.

        What arq's `_poll_iteration` (0.26 to 0.28) does, with the take of `job_taker`.
        Work is a freed slot if the last look found none free (then the take follows at
        once), else an enqueue's wake token. Returns the wait before the next look.
        """
        if wait > 0 and self._waiting_for_slot:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._slot_freed.wait()
            wait = 0.0
        most = min(self.queue_read_limit, self.max_jobs - self.job_counter)
        if self.burst and self.max_burst_jobs >= 0:
            most = min(most, self.max_burst_jobs - self._jobs_started())
        due_in_ms: int | None = None
        if self.allow_pick_jobs and most > 0:
            taken = await self._taker().take(most, lease_ms=self._lease_ms(), wait=wait)
            for job in taken.jobs:
                await self._start(job)
            due_in_ms = taken.due_in_ms
        elif wait > 0:
            # Taking nothing (stopping: arq's signal handler turned `allow_pick_jobs` off),
            # the loop still must not spin.
            await asyncio.sleep(wait)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        if self._failed_runs:
            raise self._failed_runs[0]  # an error of run_job itself ends the worker, as arq's
        await self.heart_beat()
        # Burst mode ends once the queue is empty (arq's loop checks after each look): a
        # job ending may be the last, so it wakes the loop; else a short poll, as arq's.
        self._waiting_for_slot = self.burst or self.job_counter >= self.max_jobs
        if self._waiting_for_slot:
            self._slot_freed.clear()  # set again by the next job to end
            return self._burst_poll if self.burst else IDLE_LOOK_EVERY
        if due_in_ms is None:
            return IDLE_LOOK_EVERY
        return min(IDLE_LOOK_EVERY, due_in_ms / 1000)

    async def _start(self, job: TakenJob) -> None:
        """Run a job this worker has taken, in a slot of its own."""
        await self.sem.acquire()
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(job.job_id, job.score, read=job))
        task.add_done_callback(partial(self._job_ended, job.job_id))
        self.tasks[job.job_id] = task

    def _job_ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        # Gone from `tasks` at once, not at the next look (arq's way), which may be seconds
        # away: a worker told to stop waits until `tasks` is empty.
        if self.tasks.get(job_id) is task:  # not a later run of the same job, taken again
            del self.tasks[job_id]
        self._release_sem_dec_counter_on_complete()
        self._slot_freed.set()
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, REDIS_ERRORS):
            # One of arq's own steps of the job (its ends are `finish_job`'s, which logs
            # them): the job is taken again once its lease ends.
            self._trouble.log(logging.ERROR, "asgi-worker: job %s: %s", job_id, brief(error))
        else:
            self._failed_runs.append(error)  # an error of run_job itself ends the worker

    def _lease_ms(self) -> int:
        # arq's in-progress lifetime: a job whose worker died is taken again after it.
        return int(self.in_progress_timeout_s * 1000)

    def _taker(self) -> JobTaker:
        # Made once per pool, as the pool is made in `main` (and again if it is replaced).
        if self._taker_of is None or self._taker_of.pool is not self.pool:
            self._taker_of = JobTaker(
                self.pool,
                self.queue_name,
                read_aborts=self.allow_abort_jobs,
                alive="" if self._heartbeat is None else self._heartbeat.key,
            )
        return self._taker_of

    async def close(self) -> None:
        """See arq's `Worker.close`; goes through (and logs) a Redis that is away."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        # Each job must have ended; one that failed because Redis went away is no
        # reason not to shut down.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._heartbeat is not None:
            heartbeat, self._heartbeat = self._heartbeat, None
            await heartbeat.stop()
        if self._reached_redis:
            try:
                async with asyncio.timeout(self._patience().probe_timeout):
                    await self.pool.delete(self.health_check_key)
            except REDIS_ERRORS as error:
                logger.warning("asgi-worker: Redis away at shutdown: %r", error)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None

    def _patience(self) -> Patience:
        # Asked for on every poll iteration: made once per pool.
        if self._patience_for is None or self._patience_for[0] is not self.pool:
            # A probe is one command with its retries; one second more covers the backoff.
            timeout = self._redis_timeout() + 1.0
            patience = Patience(client_url(self.pool), probe_timeout=timeout)
            self._patience_for = (self.pool, patience)
        return self._patience_for[1]

    def _redis_timeout(self) -> float:
        """The pool's connect timeout: `Config.redis_timeout`, in `worker_settings()`'s."""
        kwargs = self.pool.connection_pool.connection_kwargs
        return float(kwargs.get("socket_connect_timeout") or 2.0)

    async def _check_redis(self) -> None:
        await check_master(self.pool)

    @property
    def pool(self) -> ArqRedis:
        """The queue's pool; to `run_job`, it answers the job's first read from the take's."""
        pool: ArqRedis = self._pool  # type: ignore[assignment]
        slot = _slot.get()
        if slot is None or slot.read is None:
            return pool
        return PreReadPool(pool, slot.read, slot.read_used)  # type: ignore[return-value]

    async def run_job(self, job_id: str, score: int, read: TakenJob | None = None) -> None:
        """See arq's `Worker.run_job`; gives the job a slot to leave its commit in.

        `read`: what the take read of the job, which answers `run_job`'s own first read
        (`PreReadPool`): the job starts a round trip sooner.
        """
        slot = _Slot(score, read)
        token = _slot.set(slot)
        try:
            await super().run_job(job_id, score)
        finally:
            _slot.reset(token)
            # What the app does after its answer: its commit is sent already. The job
            # keeps its slot meanwhile, as a server keeps a request's task.
            if slot.after is not None:
                await slot.after()

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
        """See arq's `Worker.finish_job`; sends the job's commit in the same transaction.

        No Redis error ends the worker here: see `_end`, `_ride_out`.
        """
        slot = _slot.get()
        pending = slot.pending if slot is not None else None
        if slot is not None:
            slot.pending = None
        if slot is not None and not finish and keep_in_progress is None:
            # The job runs again (a `Retry`, or cancelled at shutdown); a pending commit is
            # dropped with its claim still held. arq adds `incr_score` to the job's score,
            # but the take moved that to the lease's end: count from the score it had.
            score = slot.score + (incr_score or 0)
            await self._ride_out(job_id, "put back", partial(self._run_again, job_id, score))
            return
        if not finish or keep_in_progress is not None:
            # A cron job's end, or a job this worker did not take run again: arq's own.
            arqs = partial(
                super().finish_job,
                job_id,
                finish,
                result_data,
                result_timeout_s,
                keep_result_forever,
                incr_score,
                keep_in_progress,
            )
            await self._ride_out(job_id, "ended", arqs)
            return
        expire = None if keep_result_forever else result_timeout_s
        await self._end(job_id, result_data, expire, pending)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        """See arq's `Worker.finish_failed_job` (a job expired, unreadable, ...).

        A Redis error is logged (`_ride_out`), never the worker's end.
        """
        arqs = partial(super().finish_failed_job, job_id, result_data)
        await self._ride_out(job_id, "ended", arqs)

    async def _end(
        self, job_id: str, result: bytes | None, expire: float | None, pending: _Pending | None
    ) -> None:
        """End a finished job: arq's bookkeeping and the job's commit, in one MULTI/EXEC.

        A transaction that meets an error that may pass is sent again, for up to
        `redis_timeout` in all (the commit's token makes a second one harmless). One
        that fails past that ends the job all the same, with arq's bookkeeping sent
        without MULTI: a Redis over its maxmemory with noeviction refuses every command
        queued in a MULTI, but not these deletes. Its claim is given up then, so that the
        next request enqueues the job again at once.
        """
        within = self._redis_timeout() if pending is None else pending.timeout
        send = partial(self._send_end, job_id, result, expire)
        try:
            replies = await retried(partial(send, pending, transaction=True), within=within)
        except REDIS_ERRORS as error:
            await self._ride_out(job_id, "ended", partial(send, None, transaction=False))
            if pending is not None:
                await pending.give_up(error)
            return
        if pending is not None:
            await pending.settle(replies[-1])
            replies = replies[:-1]
        for reply in replies:
            if isinstance(reply, Exception):  # a key of the wrong type: the job stays
                self._trouble.log(
                    logging.ERROR, "asgi-worker: job %s: its end failed: %s", job_id, brief(reply)
                )

    async def _send_end(
        self,
        job_id: str,
        result: bytes | None,
        expire: float | None,
        pending: _Pending | None,
        *,
        transaction: bool,
    ) -> list[Any]:
        """What arq's finish_job (0.26 to 0.28) sends for a finished job, and the commit.

        In one pipeline: a MULTI/EXEC with `transaction`. An error in one command does
        not undo the others (Redis has no rollback), so a failed commit cannot keep the
        job from ending.
        """
        pool: Any = self.pool
        async with pool.pipeline(transaction=transaction) as pipe:
            if result:
                pipe.set(result_key_prefix + job_id, result, px=to_ms(expire))
            pipe.zrem(abort_jobs_ss, job_id)
            pipe.zrem(self.queue_name, job_id)
            pipe.delete(
                in_progress_key_prefix + job_id,
                retry_key_prefix + job_id,
                job_key_prefix + job_id,
            )
            for command in [] if pending is None else pending.commands():
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _ride_out(self, job_id: str, what: str, step: Callable[[], Awaitable[Any]]) -> None:
        """`step` (some of a job's bookkeeping), tried again after an error that may pass.

        One that fails past `redis_timeout` is logged: the job is taken again once its
        lease ends (arq's in-progress key), as if this worker had died.
        """
        try:
            await retried(step, within=self._redis_timeout())
        except REDIS_ERRORS as error:
            self._trouble.log(
                logging.ERROR,
                "asgi-worker: job %s could not be %s (%s): it is taken again once its lease "
                "ends, in %g s",
                job_id,
                what,
                brief(error),
                self.in_progress_timeout_s,
            )

    async def _run_again(self, job_id: str, score: int) -> None:
        """Put a job this worker took back in the queue, due at `score` (ms)."""
        async with self.pool.pipeline(transaction=True) as transaction:
            transaction.delete(in_progress_key_prefix + job_id)
            transaction.zadd(self.queue_name, {job_id: score}, xx=True)
            await transaction.execute()


class PreReadPool:
    """The queue's pool as arq's `Worker.run_job` sees it for one job the take has read.

    `run_job` (arq 0.26 to 0.28) opens with one MULTI: GET the job, INCR its try count,
    EXPIRE that, and with `allow_abort_jobs` ZREM the job from the aborted set. `TAKE`
    did the same as it took the job. The first pipeline `run_job` opens is answered from
    that (`used` is called then); everything else goes to the pool.
    """

    def __init__(self, pool: ArqRedis, job: TakenJob, used: Callable[[], None]) -> None:
        self._pool = pool
        self._job = job
        self._used = used

    def pipeline(self, transaction: bool = True) -> PreReadPipeline:
        """The pipeline that answers `run_job`'s read; see `PreReadPipeline`."""
        self._used()
        return PreReadPipeline(self._pool, self._job, transaction)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class PreReadPipeline:
    """A pipeline that answers the read it expects from what the take read.

    Any other pipeline (an arq version that reads differently) is sent to Redis as it
    is, with a warning: the job then runs, with its try counted twice.
    """

    def __init__(self, pool: ArqRedis, job: TakenJob, transaction: bool) -> None:
        self._pool = pool
        self._job = job
        self._transaction = transaction
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    async def __aenter__(self) -> PreReadPipeline:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __getattr__(self, command: str) -> Callable[..., PreReadPipeline]:
        def queue(*args: Any, **kwargs: Any) -> PreReadPipeline:
            self._queued.append((command, args, kwargs))
            return self

        return queue

    async def execute(self) -> list[Any]:
        """The replies to the queued commands: the take's read, if it was that read."""
        job = self._job
        retry_key = retry_key_prefix + job.job_id
        expected: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("get", (job_key_prefix + job.job_id,), {}),
            ("incr", (retry_key,), {}),
            ("expire", (retry_key, RETRY_KEY_TTL), {}),
        ]
        replies: list[Any] = [job.payload, job.tries, True]
        if len(self._queued) == len(expected) + 1:
            expected.append(("zrem", (abort_jobs_ss, job.job_id), {}))
            replies.append(int(job.aborted))
        if self._queued == expected:
            return replies
        logger.warning(
            "asgi-worker: arq's first read of job %s is not the take's: sent to Redis", job.job_id
        )
        async with self._pool.pipeline(transaction=self._transaction) as pipe:
            for command, args, kwargs in self._queued:
                getattr(pipe, command)(*args, **kwargs)
            return await pipe.execute()
