"""Many workers on one queue: per-job cost, idle cost and time-to-ready, against arq's poll.

`python -m benchmarks.scale` (about 2 minutes; `--help` for the knobs). Its own
redis-server on a free loopback port, so every command and every CPU second counted is
the benchmark's. Each row is run twice in the same run, with the same replay jobs:

- `take`: `ReplayWorker` as `asgi-worker worker` runs it (one script takes the jobs a
  worker has slots for; idle, it sleeps on the wake list each enqueue pushes to);
- `arq poll`: arq's own `Worker` with the same settings (`arq module.WorkerSettings`):
  every `poll_delay` (10 ms) it reads the due jobs and races the other workers for each
  with WATCH/MULTI. What asgi-worker did before.

Measured:

- drain: N jobs queued through the middleware (N distinct cold URLs of a trivial
  endpoint), then W worker processes (not burst mode: as in production) started and held
  at a gate until all are up; from the gate to the queue's end: jobs/s, Redis commands per
  job (INFO `total_commands_processed`, which counts the commands a script runs, less the
  benchmark's own), Redis CPU per job (INFO `used_cpu_*`). 2 cores: jobs/s cannot grow
  with W here; what must not grow is the cost per job.
- idle: W workers with nothing to do for a few seconds: commands per second per worker.
- time-to-ready: one idle worker, cold URLs one after another, each polled every 1 ms from
  its 202 until it is a 200 (in process, no HTTP server): p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
import uuid
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from arq.worker import Worker
from redis.asyncio import Redis

from asgi_worker import Config, ReplayWorker, worker_settings
from benchmarks.apps import create_asgi_worker_app
from benchmarks.flood import own_redis
from benchmarks.worker_bench import _asgi_get, fill_asgi_worker

KINDS = {"take": ReplayWorker, "arq poll": Worker}


def _worker_process(kind: str, redis_url: str, prefix: str, ready: Any, go: Event) -> None:
    """One worker process: starts, says it is ready, waits at the gate, then serves."""

    async def run() -> None:
        config = Config(redis_url=redis_url, prefix=prefix)
        settings = worker_settings(create_asgi_worker_app(config), config)
        startup = settings["on_startup"]

        async def gated_startup(ctx: dict[Any, Any]) -> None:
            await startup(ctx)
            ready.put(1)
            await asyncio.to_thread(go.wait)

        settings["on_startup"] = gated_startup
        worker = KINDS[kind](**settings, handle_signals=False)
        try:
            await worker.main()
        finally:
            await worker.close()

    asyncio.run(run())


class Workers:
    """W worker processes of one kind, started and held at a gate until `open`."""

    def __init__(self, kind: str, count: int, redis_url: str, prefix: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Queue()
        self._go = context.Event()
        self._processes = [
            context.Process(
                target=_worker_process,
                args=(kind, redis_url, prefix, self._ready, self._go),
                daemon=True,
            )
            for _ in range(count)
        ]

    def start(self) -> None:
        for process in self._processes:
            process.start()
        for _ in self._processes:
            self._ready.get(timeout=60)

    def open(self) -> None:
        self._go.set()

    def stop(self) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join(10)


async def _counters(redis: Redis) -> tuple[int, float]:
    """Commands processed (this INFO included) and Redis's CPU seconds so far."""
    stats = await redis.info("stats")
    cpu = await redis.info("cpu")
    commands = int(stats["total_commands_processed"])
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def drain(kind: str, count: int, jobs: int, redis_url: str) -> dict[str, float]:
    """See the module doc: N jobs, W workers of `kind`; rates and costs per job."""
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    # All N due at once: fair queueing would space one path's jobs out (and refuse those
    # past the claim lease), which is not what this measures.
    config = Config(redis_url=redis_url, prefix=prefix, fair_queueing=False)
    await fill_asgi_worker(create_asgi_worker_app(config), jobs)
    redis = Redis.from_url(redis_url)
    workers = Workers(kind, count, redis_url, prefix)
    workers.start()
    try:
        own = 0  # commands this function sends while counting
        commands, cpu = await _counters(redis)
        workers.open()
        started = time.perf_counter()
        while await redis.zcard(config.queue):
            own += 1
            await asyncio.sleep(0.005)
        seconds = time.perf_counter() - started
        commands_after, cpu_after = await _counters(redis)
        own += 2  # the two INFO of `_counters` (the first's count includes itself)
        sent = commands_after - commands - own
        await asyncio.sleep(0.5)  # settle: every worker idle
        idle_commands, _ = await _counters(redis)
        await asyncio.sleep(IDLE_SECONDS)
        idle_after, _ = await _counters(redis)
        idle = (idle_after - idle_commands - 2) / IDLE_SECONDS / count
    finally:
        workers.stop()
        await _delete(redis, prefix)
        await redis.aclose()
    return {
        "workers": count,
        "jobs_per_second": jobs / seconds,
        "commands_per_job": sent / jobs,
        "redis_cpu_us_per_job": (cpu_after - cpu) / jobs * 1e6,
        "idle_commands_per_second": idle,
    }


IDLE_SECONDS = 6.0  # two idle looks (taking.IDLE_LOOK_EVERY)


async def time_to_ready(kind: str, urls: int, redis_url: str) -> dict[str, float]:
    """One idle worker of `kind`; cold URLs one after the other, each 202 until 200."""
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    config = Config(redis_url=redis_url, prefix=prefix)
    app = create_asgi_worker_app(config)
    workers = Workers(kind, 1, redis_url, prefix)
    workers.start()
    workers.open()
    times: list[float] = []
    floors: list[float] = []  # what the client could not beat: see benchmarks.run
    first_poll = 0
    try:
        await asyncio.sleep(0.5)
        for n in range(urls):
            started = time.perf_counter()
            status = await _asgi_get(app, "/trivial", f"ttr={n}")
            accepted = time.perf_counter()
            if status != 202:
                raise RuntimeError(f"a cold URL answered {status}")
            polls, first_pause = 0, 0.0
            while True:
                await asyncio.sleep(0.001)
                sent = time.perf_counter()
                first_pause = first_pause or sent - accepted
                polls += 1
                if await _asgi_get(app, "/trivial", f"ttr={n}") == 200:
                    break
            done = time.perf_counter()
            times.append(done - started)
            floors.append(accepted - started + first_pause + done - sent)
            first_poll += polls == 1
            await asyncio.sleep(0.02)  # the worker back to idle
    finally:
        workers.stop()
        redis = Redis.from_url(redis_url)
        await _delete(redis, prefix)
        await redis.aclose()
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": times[min(len(times) - 1, round(len(times) * 0.99))] * 1000,
        "floor_p50_ms": statistics.median(floors) * 1000,
        "first_poll_share": first_poll / len(times),
    }


async def _delete(redis: Redis, prefix: str) -> None:
    async for key in redis.scan_iter(match=f"*{prefix}*", count=1000):
        await redis.delete(key)


def report(drains: list[dict[str, Any]], ttr: dict[str, dict[str, float]], args: Any) -> str:
    lines = [
        f"Command: `python -m benchmarks.scale --jobs {args.jobs} --workers "
        f"{' '.join(map(str, args.workers))} --urls {args.urls}`",
        "",
        "| workers | worker | jobs/s | commands/job | Redis CPU µs/job | idle commands/s/worker |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in drains:
        lines.append(
            f"| {row['workers']} | {row['kind']} | {row['jobs_per_second']:,.0f} "
            f"| {row['commands_per_job']:.1f} | {row['redis_cpu_us_per_job']:.0f} "
            f"| {row['idle_commands_per_second']:.1f} |"
        )
    lines += [
        "",
        "| worker | time-to-ready p50 | p99 | ready at the first poll | the client's floor p50 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind, row in ttr.items():
        lines.append(
            f"| {kind} | {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms "
            f"| {row['first_poll_share']:.0%} | {row['floor_p50_ms']:.1f} ms |"
        )
    for kind in KINDS:
        rows = [row for row in drains if row["kind"] == kind]
        if not rows:
            continue
        costs = [row["commands_per_job"] for row in rows]
        cpus = [row["redis_cpu_us_per_job"] for row in rows]
        lines.append(
            f"\n{kind}: commands/job from {rows[0]['workers']} to {rows[-1]['workers']} "
            f"workers: x{costs[-1] / costs[0]:.2f} (max/min x{max(costs) / min(costs):.2f}); "
            f"Redis CPU/job x{cpus[-1] / cpus[0]:.2f} (max/min x{max(cpus) / min(cpus):.2f})"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace, redis_url: str) -> str:
    drains = []
    for count in args.workers:
        for kind in KINDS if count % 2 else reversed(list(KINDS)):
            row = await drain(kind, count, args.jobs, redis_url)
            drains.append({"kind": kind, **row})
            print(drains[-1], flush=True)
    drains.sort(key=lambda row: (list(KINDS).index(row["kind"]), row["workers"]))
    ttr = {kind: await time_to_ready(kind, args.urls, redis_url) for kind in KINDS}
    return report(drains, ttr, args)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2, 4, 8], help="none: time-to-ready only"
    )
    parser.add_argument("--urls", type=int, default=200, help="cold URLs for time-to-ready")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, own_redis(Path(directory)) as url:
        print(asyncio.run(main(args, url)))


if __name__ == "__main__":
    cli()
