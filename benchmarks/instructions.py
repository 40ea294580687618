"""Worker cost per job in CPU instructions (callgrind): the noise-free companion of jobs/s.

`python -m benchmarks.instructions [--jobs N]` prints one JSON object on stdout.

Jobs/s on a shared machine moves by +-15 % from round to round. Instructions executed do
not: valgrind's callgrind counts them exactly, whatever else the machine is doing, so a
change of 1 % shows. For each kind of job (the raw arq no-op, asgi-worker's replay job
under `ReplayWorker` and under arq's `Worker`, and the two references of `worker_bench`)
a backlog is filled by a plain interpreter, then a burst worker drains it under
callgrind; the same is done with an empty backlog, and

    instructions per job = (instructions with N jobs - instructions with none) / N

so interpreter start, imports and worker startup cancel out. What this leaves out is
time in the kernel (socket calls: a round trip costs more there than its instructions)
and stalls on memory, which is why the jobs/s ratio is the target and this one is the
guide: it says where a job's own work goes and whether a change made it smaller.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from arq.worker import Worker
from redis.asyncio import Redis

from asgi_worker import ReplayWorker, worker_settings
from benchmarks.apps import create_asgi_worker_app
from benchmarks.worker_bench import (
    PLAIN_ARQ,
    REFERENCE_JOBS,
    backlog_config,
    cleanup,
    fill_arq,
    fill_asgi_worker,
    prepare_reference,
    reference_worker,
)

# The replay job (under ReplayWorker, then arq's Worker), the arq no-op, the references.
KINDS = ("asgi-worker", PLAIN_ARQ, *REFERENCE_JOBS)
REPLAY_KINDS = {"asgi-worker": ReplayWorker, PLAIN_ARQ: Worker}


async def fill(kind: str, redis_url: str, prefix: str, jobs: int) -> None:
    """Queue `jobs` jobs of `kind`: cold GETs through the middleware, or arq enqueues."""
    if kind in REPLAY_KINDS:
        app = create_asgi_worker_app(backlog_config(redis_url, prefix))
        await fill_asgi_worker(app, jobs)
    else:
        await fill_arq(redis_url, prefix, jobs)


async def drain(kind: str, redis_url: str, prefix: str) -> int:
    """Run a burst worker for `kind` until its queue is empty; returns jobs completed."""
    client = Redis.from_url(redis_url)
    if kind in REPLAY_KINDS:
        config = backlog_config(redis_url, prefix)
        app = create_asgi_worker_app(config)
        settings = worker_settings(app, config)
        worker = REPLAY_KINDS[kind](**settings, burst=True, handle_signals=False)
    else:

        async def startup(ctx: dict[Any, Any]) -> None:
            prepare_reference(ctx, client, redis_url, prefix)

        worker = reference_worker(kind, redis_url, prefix, startup)
    try:
        await worker.main()
    finally:
        await worker.close()
        await client.aclose()
    if worker.jobs_failed:
        raise RuntimeError(f"{kind}: {worker.jobs_failed} jobs failed")
    return worker.jobs_complete


def _instructions(kind: str, redis_url: str, jobs: int, workdir: Path) -> int:
    """Instructions of one drain of `jobs` jobs (0: startup and shutdown only)."""
    prefix = f"awbench-ir-{uuid.uuid4().hex[:8]}"
    me = [sys.executable, "-m", "benchmarks.instructions", "--redis-url", redis_url]
    try:
        if jobs:
            _run([*me, "fill", kind, prefix, str(jobs)])
        out = workdir / f"{prefix}.callgrind"
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        done = _run([*valgrind, *me, "drain", kind, prefix])
        if f"completed {jobs}" not in done.stdout:
            raise RuntimeError(f"{kind}: expected {jobs} jobs, the drain said {done.stdout!r}")
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"no instruction total in {out}")
    finally:
        asyncio.run(cleanup(redis_url, prefix))


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{done.stderr[-2000:]}")
    return done


def measure(redis_url: str, jobs: int) -> dict[str, Any]:
    """Instructions per job of each kind, and their ratio to the arq no-op job."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed (apt-get install -y valgrind)")
    per_job: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        for kind in KINDS:
            empty = _instructions(kind, redis_url, 0, Path(workdir))
            full = _instructions(kind, redis_url, jobs, Path(workdir))
            per_job[kind] = (full - empty) / jobs
    baseline = per_job["arq"]
    return {
        "jobs": jobs,
        "instructions_per_job": per_job,
        "ratio_to_arq": {kind: baseline / value for kind, value in per_job.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    sub = parser.add_subparsers(dest="step")
    run = sub.add_parser("measure", help="the whole measurement (the default)")
    run.add_argument("--jobs", type=int, default=300)
    for name in ("fill", "drain"):
        step = sub.add_parser(name, help=f"internal: {name} one backlog")
        step.add_argument("kind", choices=KINDS)
        step.add_argument("prefix")
        if name == "fill":
            step.add_argument("jobs", type=int)
    args = parser.parse_args()
    if args.step == "fill":
        asyncio.run(fill(args.kind, args.redis_url, args.prefix, args.jobs))
    elif args.step == "drain":
        print(f"completed {asyncio.run(drain(args.kind, args.redis_url, args.prefix))}")
    else:
        print(json.dumps(measure(args.redis_url, getattr(args, "jobs", 300))))


if __name__ == "__main__":
    main()
