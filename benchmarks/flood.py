"""Under attack: a cache-busting flood on one path, and a cold URL of another path.

`python -m benchmarks.flood` (about 2 minutes; starts a `redis-server` of its own on a
free loopback port, so that its memory is the flood's alone). One uvicorn process, one
`asgi-worker worker` with `max_jobs=10`, and `/slow` and `/other` endpoints that take
1 s each. For each setting in turn:

1. a flood of distinct URLs on `/slow` (`/slow?r=<n>`) at `--rate` requests/s for
   `--seconds`, from `--connections` keep-alive connections (a small raw HTTP/1.1 client:
   a Python one fast enough for 1,000 requests/s on a busy 2-core machine);
2. meanwhile, every 2 s a new cold URL of `/other` is requested, then polled every 50 ms
   until it answers 200: its time-to-ready is what a legitimate user waits;
3. the queue's length and Redis's memory are sampled every 0.5 s.

The settings are compared in the same run (ratios, not absolute times): `fair` is the
default (`max_queued=10000`, fair queueing on); `fifo` turns fair queueing off (the
queue is in arrival order, as before, but still capped). The flood's own answers are
counted by status: `202` (queued, or already queued), `503` (refused: queue full).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from .servers import free_port, process_env, serve, stop, worker

SLOW_SECONDS = 1.0
PROBE_EVERY = 2.0
PROBE_TIMEOUT = 40.0


@dataclass
class Outcome:
    """What one setting measured."""

    name: str
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    ready: list[float] = field(default_factory=list)
    """Time-to-ready of each cold URL of another path (s); inf if never within the wait."""
    queue_peak: int = 0
    memory_growth: int = 0
    seconds: float = 0.0


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench.local\r\n\r\n".encode())
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return int(status_line.split()[1])


async def _flood(port: int, rate: float, seconds: float, connections: int, out: Outcome) -> None:
    """Distinct `/slow?r=` URLs at `rate` per second in all, for `seconds`."""
    per_connection = rate / connections
    started = time.perf_counter()

    async def one(index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        try:
            while (elapsed := time.perf_counter() - started) < seconds:
                # Paced: the n-th request of this connection goes at n / per_connection s.
                ahead = sent / per_connection - elapsed
                if ahead > 0:
                    await asyncio.sleep(ahead)
                status = await _request(
                    reader, writer, f"/slow?r={index}-{sent}-{uuid.uuid4().hex[:6]}"
                )
                out.statuses[status] = out.statuses.get(status, 0) + 1
                sent += 1
        finally:
            out.sent += sent
            writer.close()

    await asyncio.gather(*(one(index) for index in range(connections)))


async def _probe_url(port: int, path: str) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < PROBE_TIMEOUT:
            if await _request(reader, writer, path) == 200:
                return time.perf_counter() - started
            await asyncio.sleep(0.05)
        return float("inf")
    finally:
        writer.close()


async def _scenario(
    port: int, redis: Redis, queue: str, args: argparse.Namespace, out: Outcome
) -> None:
    memory_before = int((await redis.info("memory"))["used_memory"])
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            out.queue_peak = max(out.queue_peak, int(await redis.zcard(queue)))
            used = int((await redis.info("memory"))["used_memory"])
            out.memory_growth = max(out.memory_growth, used - memory_before)
            await asyncio.sleep(0.5)

    async def probes() -> None:
        tasks = []
        number = 0
        while not stop.is_set():
            await asyncio.sleep(PROBE_EVERY)
            number += 1
            tasks.append(
                asyncio.create_task(_probe_url(port, f"/other?probe={number}-{uuid.uuid4().hex}"))
            )
        out.ready.extend(await asyncio.gather(*tasks))

    started = time.perf_counter()
    sampler, prober = asyncio.create_task(sample()), asyncio.create_task(probes())
    await _flood(port, args.rate, args.seconds, args.connections, out)
    out.seconds = time.perf_counter() - started
    stop.set()
    await asyncio.gather(sampler, prober)


def run_setting(name: str, extra: dict[str, str], args: argparse.Namespace, logs: Path) -> Outcome:
    prefix = f"awbench-flood-{uuid.uuid4().hex[:8]}"
    env = process_env(
        BENCH_PREFIX=prefix,
        BENCH_SLOW_SECONDS=str(SLOW_SECONDS),
        ASGI_WORKER_REDIS_URL=args.redis_url,
        ASGI_WORKER_PREFIX=prefix,
        ASGI_WORKER_EXCLUDE="/health",
        ASGI_WORKER_MAX_JOBS="10",
        ASGI_WORKER_JOB_TIMEOUT="10",
        **extra,
    )
    out = Outcome(name)

    async def main(port: int) -> None:
        redis = Redis.from_url(args.redis_url)
        try:
            await _scenario(port, redis, f"{prefix}:queue", args, out)
        finally:
            async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
                await redis.delete(key)
            async for key in redis.scan_iter(match=f"arq:*{prefix}*", count=1000):
                await redis.delete(key)
            await redis.aclose()

    with (
        serve(f"web-{name}", "benchmarks.apps:asgi_worker_app", env, logs) as web,
        worker(env, logs, name=f"worker-{name}"),
    ):
        asyncio.run(main(web.port))
    return out


def report(outcomes: list[Outcome], args: argparse.Namespace) -> str:
    lines = [
        f"Flood: distinct `/slow?r=` URLs at {args.rate:g}/s for {args.seconds:g} s "
        f"({args.connections} connections); cold `/other` URLs every {PROBE_EVERY:g} s; "
        f"both endpoints take {SLOW_SECONDS:g} s; one worker, `max_jobs=10`.",
        "",
        "| setting | flood sent (req/s) | 202 | 503 | queue peak | Redis memory growth "
        "| cold URL ready p50 | max | never (of) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for out in outcomes:
        finite = [value for value in out.ready if value != float("inf")]
        never = len(out.ready) - len(finite)
        p50 = f"{statistics.median(finite):.2f} s" if finite else "-"
        worst = f"{max(finite):.2f} s" if finite else "-"
        lines.append(
            f"| {out.name} | {out.sent:,} ({out.sent / out.seconds:,.0f}) "
            f"| {out.statuses.get(202, 0):,} | {out.statuses.get(503, 0):,} "
            f"| {out.queue_peak:,} | {out.memory_growth / 1e6:.1f} MB | {p50} | {worst} "
            f"| {never} ({len(out.ready)}) |"
        )
    return "\n".join(lines)


@contextmanager
def own_redis(directory: Path) -> Iterator[str]:
    """A `redis-server` on a free loopback port, nothing persisted; stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = SyncRedis.from_url(url)
        for _ in range(100):
            try:
                client.ping()
                break
            except RedisConnectionError:
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aw-flood-") as directory:
        logs = Path(directory)
        outcomes = []
        for name, extra in (
            ("fair (default)", {}),
            ("fifo", {"ASGI_WORKER_FAIR_QUEUEING": "false"}),
        ):
            with own_redis(logs) as args.redis_url:
                outcomes.append(run_setting(name, extra, args, logs))
    print(report(outcomes, args))


if __name__ == "__main__":
    main()
