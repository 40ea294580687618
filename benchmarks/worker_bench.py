"""Worker throughput: asgi-worker replays/s against raw arq no-op jobs/s, same settings.

Run by `benchmarks.run` in a fresh interpreter: `python -m benchmarks.worker_bench
--jobs N --rounds R --prefix P`. Prints one JSON object on stdout.

Per round, interleaved (the order alternates between rounds):

- asgi-worker: N distinct cold URLs of a trivial endpoint are requested through the real
  middleware (each a `202` that claims and enqueues one job), then a real arq worker built
  by `asgi_worker.worker_settings()` drains the backlog in burst mode: a `ReplayWorker`
  (as `asgi-worker worker` runs), and, as its own row, arq's plain `Worker` (as
  `arq module.WorkerSettings` runs), whose jobs each commit in a round trip of their own.
- raw arq: N no-op jobs enqueued with `enqueue_job`, drained by a plain `arq.Worker`.
- two references, raw arq jobs that each do one part of a replay job, to show where its
  cost goes: `arq + SET` stores a value the size of the trivial endpoint's entry with one
  Redis round trip (what any job that keeps its result in Redis must do at least), and
  `arq + replay` runs the trivial endpoint through the same app with asgi-worker's replay
  and encodes the entry, but stores nothing.

Both workers use the same queue settings (`poll_delay`, `max_jobs` from asgi-worker's
defaults, `keep_result=0`). The clock runs from the end of the worker's startup (after
`on_startup`: connections, the app's lifespan) to the moment the burst run returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.typing import StartupShutdown
from arq.worker import Worker, func
from asgi_lifespan import LifespanManager
from redis.asyncio import Redis

from asgi_worker import Config, ReplayWorker, worker_settings
from asgi_worker.core.keys import RequestSnapshot
from asgi_worker.core.replay import replay
from asgi_worker.worker.job import to_write
from benchmarks import profiling
from benchmarks.apps import create_asgi_worker_app
from benchmarks.servers import cpu_seconds

BACKLOG_CONCURRENCY = 32
PLAIN_ARQ = "asgi-worker (arq's Worker)"
"""The same jobs run by arq's own `Worker` (`arq module.WorkerSettings`): each job then
commits on its own, one round trip more than under `ReplayWorker`."""
Runner = Callable[..., Awaitable[dict[str, float]]]
PROFILE_JOBS = 5000  # enough seconds of draining for a few thousand samples


async def _asgi_get(app: Any, path: str, query: str) -> int:
    """One GET through the ASGI app, in process; returns the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"bench.local")],
        "client": ("127.0.0.1", 50000),
        "server": ("bench.local", 80),
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


@contextlib.asynccontextmanager
async def _profiled(out: Path | None) -> AsyncIterator[None]:
    """Sample this very process with py-spy while the block runs (if `out` is given)."""
    if out is None:
        yield
        return
    spy = profiling.record(os.getpid(), 600, out)
    await asyncio.sleep(0.5)  # let py-spy attach before the clock starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        await asyncio.to_thread(spy.wait, 30)


async def asgi_worker_round(
    redis_url: str,
    prefix: str,
    jobs: int,
    profile: Path | None = None,
    *,
    worker_class: type[Worker] = ReplayWorker,
) -> dict[str, float]:
    redis_pid = await _redis_pid(redis_url)
    config = backlog_config(redis_url, prefix)
    app = create_asgi_worker_app(config)
    await fill_asgi_worker(app, jobs)
    settings = worker_settings(app, config)
    started: list[float] = []
    startup = settings["on_startup"]

    async def timed_startup(ctx: dict[Any, Any]) -> None:
        await startup(ctx)
        started.extend(_clocks(redis_pid))

    settings["on_startup"] = timed_startup
    worker = worker_class(**settings, burst=True, handle_signals=False)
    return await _drain(worker, "asgi-worker", jobs, started, redis_pid, profile)


def backlog_config(redis_url: str, prefix: str) -> Config:
    """The defaults, but for fair queueing, for a backlog of one path all due at once.

    Fair queueing would space such a backlog out, and refuse (503) what could not start
    within the claim lease.
    """
    return Config(redis_url=redis_url, prefix=prefix, fair_queueing=False)


async def fill_asgi_worker(app: Any, jobs: int) -> None:
    """Queue `jobs` replay jobs: cold GETs through the middleware, 32 at a time."""
    statuses: dict[int, int] = {}
    queue = iter(range(jobs))

    async def client() -> None:
        for i in queue:
            status = await _asgi_get(app, "/trivial", f"k={i}")
            statuses[status] = statuses.get(status, 0) + 1

    async with LifespanManager(app):
        await asyncio.gather(*(client() for _ in range(BACKLOG_CONCURRENCY)))
    if statuses != {202: jobs}:
        raise RuntimeError(f"backlog: expected {jobs} x 202, got {statuses}")


async def _drain(
    worker: Worker,
    name: str,
    jobs: int,
    started: list[float],
    redis_pid: int | None,
    profile: Path | None,
) -> dict[str, float]:
    """Run a burst worker until its backlog is gone; its rate from `started` (see `_rate`)."""
    try:
        async with _profiled(profile):
            await worker.main()
        finished = _clocks(redis_pid)
    finally:
        await worker.close()
    return _rate(name, worker, jobs, started, finished)


def _clocks(redis_pid: int | None) -> list[float]:
    """Wall clock, this process's CPU time (user + system), Redis's CPU time (or NaN)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    redis_cpu = cpu_seconds(redis_pid) if redis_pid is not None else None
    return [
        time.perf_counter(),
        usage.ru_utime + usage.ru_stime,
        float("nan") if redis_cpu is None else redis_cpu,
    ]


def _rate(
    name: str, worker: Worker, jobs: int, started: list[float], finished: list[float]
) -> dict[str, float]:
    if worker.jobs_complete != jobs or worker.jobs_failed:
        raise RuntimeError(
            f"{name}: {worker.jobs_complete} of {jobs} complete, {worker.jobs_failed} failed"
        )
    seconds = finished[0] - started[0]
    return {
        "jobs": jobs,
        "seconds": seconds,
        "per_second": jobs / seconds,
        "worker_cpu_us_per_job": (finished[1] - started[1]) / jobs * 1e6,
        "redis_cpu_us_per_job": (finished[2] - started[2]) / jobs * 1e6,
    }


async def _noop(ctx: dict[Any, Any]) -> None:
    return None


# About the size of the trivial endpoint's stored entry (status, 4 headers, "ok").
_REFERENCE_ENTRY = b"x" * 160


async def _store_one(ctx: dict[Any, Any]) -> None:
    """Reference: one Redis round trip that stores an entry-sized value."""
    await ctx["bench_redis"].set(f"{ctx['bench_prefix']}:ref:{ctx['job_id']}", _REFERENCE_ENTRY)


async def _replay_only(ctx: dict[Any, Any]) -> None:
    """Reference: the replay and encoding of a replay job, without the store."""
    config: Config = ctx["bench_config"]
    query = ctx["job_id"].rpartition(":")[2].encode()
    snapshot = RequestSnapshot("http", "bench.local", "", "/trivial", None, b"k=" + query, ())
    replayed = await replay(ctx["bench_app"], snapshot, max_body_bytes=config.max_body_bytes)
    to_write(replayed, outcome="stored", snapshot=snapshot, config=config)


REFERENCE_JOBS = {"arq": _noop, "arq + SET": _store_one, "arq + replay": _replay_only}
"""Raw arq runs: the no-op baseline and the two references (see the module doc)."""


async def arq_round(
    redis_url: str, prefix: str, jobs: int, profile: Path | None = None, *, kind: str = "arq"
) -> dict[str, float]:
    redis_pid = await _redis_pid(redis_url)
    await fill_arq(redis_url, prefix, jobs)
    started: list[float] = []
    client = Redis.from_url(redis_url)

    async def startup(ctx: dict[Any, Any]) -> None:
        prepare_reference(ctx, client, redis_url, prefix)
        started.extend(_clocks(redis_pid))

    worker = reference_worker(kind, redis_url, prefix, startup)
    try:
        return await _drain(worker, kind, jobs, started, redis_pid, profile)
    finally:
        await client.aclose()


async def fill_arq(redis_url: str, prefix: str, jobs: int) -> None:
    """Queue `jobs` no-op arq jobs (the reference runs' backlog), 32 enqueues at a time."""
    queue_name = f"{prefix}:queue"
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=queue_name)
    try:
        ids = iter(range(jobs))

        async def client() -> None:
            for i in ids:
                await pool.enqueue_job("noop", _job_id=f"{prefix}:{i}", _queue_name=queue_name)

        await asyncio.gather(*(client() for _ in range(BACKLOG_CONCURRENCY)))
    finally:
        await pool.aclose()


def prepare_reference(ctx: dict[Any, Any], client: Redis, redis_url: str, prefix: str) -> None:
    """What the reference jobs find in arq's ctx: a Redis client, the app, its config."""
    config = Config(redis_url=redis_url, prefix=prefix)
    ctx.update(
        bench_redis=client,
        bench_prefix=prefix,
        bench_config=config,
        bench_app=create_asgi_worker_app(config),
    )


def reference_worker(kind: str, redis_url: str, prefix: str, startup: StartupShutdown) -> Worker:
    """A burst arq worker for `REFERENCE_JOBS[kind]`, with asgi-worker's queue settings."""
    defaults = Config()
    return Worker(
        functions=[func(REFERENCE_JOBS[kind], name="noop", keep_result=0)],
        queue_name=f"{prefix}:queue",
        redis_settings=RedisSettings.from_dsn(redis_url),
        burst=True,
        handle_signals=False,
        poll_delay=defaults.poll_delay,
        max_jobs=defaults.max_jobs,
        keep_result=0,
        on_startup=startup,
    )


async def _redis_pid(redis_url: str) -> int | None:
    """The Redis server's pid, if it runs on this machine (for its CPU time)."""
    client = Redis.from_url(redis_url)
    try:
        pid = int((await client.info("server"))["process_id"])
    finally:
        await client.aclose()
    return pid if cpu_seconds(pid) is not None else None


async def cleanup(redis_url: str, prefix: str) -> int:
    """Delete this benchmark's keys (ours start with the prefix; arq's hold it in the id)."""
    client = Redis.from_url(redis_url)
    deleted = 0
    try:
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            async for key in client.scan_iter(match=pattern, count=1000):
                deleted += await client.delete(key)
    finally:
        await client.aclose()
    return deleted


async def main(
    redis_url: str, prefix: str, jobs: int, rounds: int, profile_dir: Path | None
) -> dict[str, Any]:
    runners: dict[str, Runner] = {
        "asgi-worker": asgi_worker_round,
        PLAIN_ARQ: functools.partial(asgi_worker_round, worker_class=Worker),
    }
    for kind in REFERENCE_JOBS:
        runners[kind] = functools.partial(arq_round, kind=kind)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    try:
        for r in range(rounds):
            # asgi-worker and its baseline back to back, in alternating order.
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                round_prefix = f"{prefix}-{r}-{''.join(filter(str.isalnum, name))}"
                results[name].append(await runners[name](redis_url, round_prefix, jobs))
                await cleanup(redis_url, round_prefix)
        if profile_dir is not None:
            # Extra rounds under py-spy, after the timed ones (sampling costs a little).
            for name in ("asgi-worker", "arq"):
                out = profile_dir / f"worker-{name}.txt"
                results[f"{name} (profiled)"] = [
                    await runners[name](redis_url, f"{prefix}-{name}-profiled", PROFILE_JOBS, out)
                ]
                await cleanup(redis_url, f"{prefix}-{name}-profiled")
    finally:
        await cleanup(redis_url, prefix)
    defaults = Config()
    return {
        "jobs": jobs,
        "rounds": rounds,
        "poll_delay": defaults.poll_delay,
        "max_jobs": defaults.max_jobs,
        **results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--profile-dir", type=Path, help="also profile one round of each")
    args = parser.parse_args()
    result = asyncio.run(
        main(args.redis_url, args.prefix, args.jobs, args.rounds, args.profile_dir)
    )
    print(json.dumps(result))
