"""Run every benchmark of asgi-worker in one go and print a table of ratios.

    nox -s bench                      # the full run (~6 minutes on 2 cores)
    nox -s bench -- --quick           # ~1-2 minutes, fewer rounds and shorter loads
    python -m benchmarks.run --help   # inside the bench virtualenv

Needs Redis (`--redis-url`, default redis://127.0.0.1:6379/0; never flushed: every key of
a run starts with a fresh prefix and only those are deleted) and, for the load, `wrk`
(`apt-get install -y wrk`; without it a slower Python client is used and the table
says so). Results go to `benchmarks/results/` (JSON, Markdown table, PNG plot).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from redis import Redis

from asgi_worker import Config
from asgi_worker.core.codec import decode_response
from benchmarks import profiling, report
from benchmarks.apps import PAYLOAD, floor_blob, floor_key
from benchmarks.load import HttpConnection, get_many, run_load, wrk_available
from benchmarks.peers import cashews_key
from benchmarks.servers import (
    ROOT,
    Server,
    children_cpu_seconds,
    cpu_seconds,
    machine_busy_seconds,
    process_env,
    rss_kib,
    run_burst_worker,
    serve,
    worker,
)

RESULTS = ROOT / "benchmarks" / "results"
RAW = RESULTS / "raw"  # logs and raw py-spy output (git-ignored)

AW_HIT = "asgi-worker hit"
AW_NEAR = "asgi-worker hit (near cache 0.1 s)"
AW_SOLO = "asgi-worker hit (coalesce=False)"
NEAR_CACHE_TTL = "0.1"  # the value Config's docs suggest

# name -> (uvicorn app spec, readiness probe path)
APPS: dict[str, tuple[str, str]] = {
    "bare": ("benchmarks.apps:bare", "/health"),
    "redis-floor": ("benchmarks.apps:redis_floor", "/health"),
    AW_HIT: ("benchmarks.apps:asgi_worker_app", "/health"),
    "fastapi-cache2": ("benchmarks.peers:fastapi_cache_app", "/health"),
    "cashews": ("benchmarks.peers:cashews_app", "/health"),
    "cashews (protected=False)": ("benchmarks.peers:cashews_unprotected_app", "/health"),
}
# For information: every request doing its own Redis lookup (single-flight off), which
# is what the hit path costs when requests for one key do not overlap.
APPS[AW_SOLO] = APPS[AW_HIT]
if "near_cache_ttl" in {f.name for f in dataclasses.fields(Config)}:
    # Not a target, for information: the optional in-process near cache for hot keys.
    APPS[AW_NEAR] = APPS[AW_HIT]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_get(url: str) -> tuple[int, dict[str, str], bytes]:
    """One GET with the standard library (prewarming and checks, not load)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        return response.status, headers, response.read()


def require(ok: bool, message: str) -> None:
    """Fail the run loudly: a benchmark that measured the wrong thing is worse than none."""
    if not ok:
        raise RuntimeError(message)


def delete_prefix(redis: Redis, prefix: str) -> int:
    """Delete this run's keys only: ours start with the prefix, arq's hold it in the id."""
    deleted = 0
    for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
        for key in redis.scan_iter(match=pattern, count=1000):
            deleted += int(redis.delete(key))
    return deleted


def entry_size(redis: Redis, key: str) -> dict[str, int]:
    """STRLEN and MEMORY USAGE (all samples) of one key."""
    return {
        "key_bytes": len(key.encode()),
        "strlen": int(redis.strlen(key)),
        "memory_usage": int(redis.memory_usage(key, samples=0) or 0),
    }


# ------------------------------------------------------------------ 1-4 throughput


def _prewarm(name: str, server: Server, redis: Redis, env: dict[str, str], logs: Path) -> None:
    url = server.url("/item")
    if name == "redis-floor":
        redis.set(floor_key(env["BENCH_PREFIX"]), floor_blob())
    elif name.startswith(AW_HIT):
        status, _, _ = http_get(url)
        require(status == 202, f"asgi-worker: first GET gave {status}, not 202")
        run_burst_worker(env, logs, "prewarm-worker")
    elif name.startswith(("fastapi-cache2", "cashews")):
        http_get(url)  # the miss, which stores
    status, headers, body = http_get(url)
    require(status == 200 and body == PAYLOAD, f"{name}: {status}, {len(body)} bytes")
    if name.startswith(AW_HIT):
        require("hit" in headers.get("cache-status", ""), f"{name}: not a hit: {headers}")
    if name == "fastapi-cache2":
        require(headers.get("x-fastapi-cache") == "HIT", f"fastapi-cache2: not a hit: {headers}")
    if name.startswith("cashews"):
        key = cashews_key(env["BENCH_PREFIX"], protected=name == "cashews")
        require(redis.exists(key) == 1, f"{name}: nothing stored")


def throughput(args: argparse.Namespace, prefix: str, redis: Redis, logs: Path) -> dict[str, Any]:
    """Requests/s of every app on `GET /item`, interleaved, in rounds."""
    env = process_env(BENCH_PREFIX=prefix, BENCH_REDIS_URL=args.redis_url)
    aw_prefix = f"{prefix}-hit"
    aw_env = {
        **env,
        "ASGI_WORKER_REDIS_URL": args.redis_url,
        "ASGI_WORKER_PREFIX": aw_prefix,
        "ASGI_WORKER_TTL": "3600",  # longer than the run: every request of the load is a hit
        "ASGI_WORKER_EXCLUDE": "/health",
    }
    app_envs = {
        AW_HIT: aw_env,
        AW_NEAR: {
            **aw_env,
            "ASGI_WORKER_PREFIX": f"{prefix}-near",
            "ASGI_WORKER_NEAR_CACHE_TTL": NEAR_CACHE_TTL,
        },
        AW_SOLO: {**aw_env, "ASGI_WORKER_PREFIX": f"{prefix}-solo", "ASGI_WORKER_COALESCE": "0"},
    }
    names = list(APPS)
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    out: dict[str, Any] = {"rounds": rounds}
    with ExitStack() as stack:
        servers: dict[str, Server] = {}
        for name in names:
            spec, probe = APPS[name]
            app_env = app_envs.get(name, env)
            servers[name] = stack.enter_context(serve(_slug(name), spec, app_env, logs, probe))
            _prewarm(name, servers[name], redis, app_env, logs)
        log("all apps up and prewarmed; every request of the load is a hit")

        for name in names:
            run_load(servers[name].url("/item"), seconds=args.warmup, connections=args.connections)
        redis_pid = int(redis.info("server")["process_id"])
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                server = servers[name]
                before = _cpu_snapshot(server.pid, redis_pid)
                result = run_load(
                    server.url("/item"), seconds=args.duration, connections=args.connections
                )
                after = _cpu_snapshot(server.pid, redis_pid)
                require(result.errors == 0, f"{name}: {result.errors} errors in round {r}")
                rounds[name].append(
                    {
                        **asdict(result),
                        **{key: _delta(before[key], after[key]) for key in before},
                    }
                )
            summary = ", ".join(f"{n} {rounds[n][-1]['requests_per_second']:.0f}" for n in names)
            log(f"round {r + 1}/{args.rounds} req/s: {summary}")

        # Still hits at the end: no job was enqueued, the entry is still there.
        for name in (n for n in names if n.startswith(AW_HIT)):
            status, headers, _ = http_get(servers[name].url("/item"))
            require(status == 200 and "hit" in headers.get("cache-status", ""), f"{name}: no hit")
            queue = f"{app_envs[name]['ASGI_WORKER_PREFIX']}:queue"
            require(redis.zcard(queue) == 0, f"{name}: jobs enqueued under load")

        ratio = median(_per_round(rounds, AW_HIT, "redis-floor"))
        if args.profile == "always" or (args.profile == "auto" and ratio < 0.9):
            out["profiles"] = _profile_hit_path(args, servers)

        out["rss_kib"] = {name: rss_kib(server.pid) for name, server in servers.items()}
        aw_keys = list(redis.scan_iter(match=f"{aw_prefix}:*:resp"))
        fc_keys = list(redis.scan_iter(match=f"{prefix}:fc:*"))
        out["entries_1kib"] = {
            "redis-floor": entry_size(redis, floor_key(prefix)),
            "asgi-worker": entry_size(redis, aw_keys[0].decode()),
            "fastapi-cache2": entry_size(redis, fc_keys[0].decode()),
            "cashews": entry_size(redis, cashews_key(prefix)),
            "cashews (protected=False)": entry_size(redis, cashews_key(prefix, protected=False)),
        }
    out["tool"] = rounds[names[0]][0]["tool"]
    return out


def _cpu_snapshot(web_pid: int, redis_pid: int) -> dict[str, float | None]:
    return {
        "web_cpu_seconds": cpu_seconds(web_pid),
        "redis_cpu_seconds": cpu_seconds(redis_pid),
        "load_generator_cpu_seconds": children_cpu_seconds(),
        "machine_cpu_seconds": machine_busy_seconds(),
    }


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _per_round(rounds: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    return [
        x["requests_per_second"] / y["requests_per_second"]
        for x, y in zip(rounds[a], rounds[b], strict=True)
    ]


def _profile_hit_path(args: argparse.Namespace, servers: dict[str, Server]) -> dict[str, Any]:
    profiles: dict[str, Any] = {}
    for name in (AW_HIT, "redis-floor"):
        raw = RAW / f"profile-{_slug(name)}.txt"
        log(f"profiling {name} under load with py-spy ({args.profile_seconds}s)")
        spy = profiling.record(servers[name].pid, args.profile_seconds, raw)
        time.sleep(0.5)  # let py-spy attach
        load = run_load(
            servers[name].url("/item"), seconds=args.profile_seconds, connections=args.connections
        )
        _, err = spy.communicate(timeout=60)
        require(spy.returncode == 0, f"py-spy failed: {err.decode(errors='replace')}")
        summary = profiling.summarise(raw)
        profiles[name] = {
            **asdict(summary),
            "requests_per_second_while_sampled": load.requests_per_second,
            "asgi_worker_inclusive": profiling.inclusive_of(raw, "asgi_worker/"),
        }
    return profiles


# ------------------------------------------------------------------ 5 time-to-ready


@dataclass(frozen=True, slots=True)
class _Ready:
    """One cold URL's way to its first 200, as the polling client saw it (seconds)."""

    total: float
    """From sending the first GET to receiving the first 200: the time-to-ready."""
    floor: float
    """The first GET's round trip (the 202), the first pause, and the 200's round trip:
    what this client could not have beaten even had the response been there at once."""
    polls: int


async def _time_to_ready(base_url: str, paths: list[str], poll_interval: float) -> list[_Ready]:
    host, _, port = base_url.removeprefix("http://").partition(":")
    conn = HttpConnection(host, int(port))
    rng = random.Random(6)
    samples: list[_Ready] = []
    try:
        for path in paths:
            # A random pause: the request arrives at a random moment of the worker's poll.
            await asyncio.sleep(rng.uniform(0.0, 0.02))
            started = time.perf_counter()
            status, _, _ = await conn.get(path)
            accepted = time.perf_counter()
            require(status == 202, f"time-to-ready: first GET of {path} gave {status}")
            first_pause = 0.0
            polls = 0
            while True:
                await asyncio.sleep(poll_interval)
                sent = time.perf_counter()
                first_pause = first_pause or sent - accepted
                polls += 1
                status, _, _ = await conn.get(path)
                if status == 200:
                    done = time.perf_counter()
                    floor = accepted - started + first_pause + done - sent
                    samples.append(_Ready(done - started, floor, polls))
                    break
                require(status == 202, f"time-to-ready: {path} gave {status}")
                require(time.perf_counter() - started < 30, f"{path} not ready in 30 s")
    finally:
        await conn.close()
    return samples


def time_to_ready(args: argparse.Namespace, prefix: str, logs: Path) -> dict[str, Any]:
    """From the first GET (202) of a cold URL to the first 200, default settings."""
    env = process_env(
        BENCH_PREFIX=prefix,
        BENCH_REDIS_URL=args.redis_url,
        ASGI_WORKER_REDIS_URL=args.redis_url,
        ASGI_WORKER_PREFIX=f"{prefix}-ttr",
    )
    spec = APPS[AW_HIT][0]
    with serve("ttr-web", spec, env, logs, probe="/trivial?probe") as server, worker(env, logs):
        # The worker is ready once a first URL has made it through.
        asyncio.run(_time_to_ready(server.base_url, ["/trivial?warm"], args.poll_interval))
        paths = [f"/trivial?ttr={i}" for i in range(args.ttr_urls)]
        samples = asyncio.run(_time_to_ready(server.base_url, paths, args.poll_interval))
    ms = sorted(sample.total * 1000 for sample in samples)
    floors = sorted(sample.floor * 1000 for sample in samples)
    return {
        "urls": len(ms),
        "poll_interval_ms": args.poll_interval * 1000,
        "p50_ms": _quantile(ms, 0.50),
        "p95_ms": _quantile(ms, 0.95),
        "p99_ms": _quantile(ms, 0.99),
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "floor_p50_ms": _quantile(floors, 0.50),
        "first_poll_share": sum(sample.polls == 1 for sample in samples) / len(samples),
    }


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# ------------------------------------------------------------------ 6 worker throughput


def worker_throughput(
    args: argparse.Namespace, prefix: str, *, rounds: int, profile: bool = False
) -> dict[str, Any]:
    """Replays/s against raw arq no-op jobs/s, in a fresh interpreter."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.worker_bench",
        "--redis-url",
        args.redis_url,
        "--prefix",
        f"{prefix}-wt",
        "--jobs",
        str(args.jobs),
        "--rounds",
        str(rounds),
    ]
    if profile:
        command += ["--profile-dir", str(RAW)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    require(done.returncode == 0, f"worker_bench failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    if profile:
        result["profiles"] = {
            name: asdict(profiling.summarise(RAW / f"worker-{name}.txt"))
            for name in ("asgi-worker", "arq")
        }
        result["profiles"]["asgi-worker"]["asgi_worker_inclusive"] = profiling.inclusive_of(
            RAW / "worker-asgi-worker.txt", "asgi_worker/"
        )
    return result


def worker_instructions(args: argparse.Namespace) -> dict[str, Any]:
    """Instructions per job under callgrind (benchmarks.instructions), if valgrind is here."""
    if shutil.which("valgrind") is None:
        return {"skipped": "valgrind is not installed (apt-get install -y valgrind)"}
    command = [sys.executable, "-m", "benchmarks.instructions", "--redis-url", args.redis_url]
    command += ["measure", "--jobs", str(args.instruction_jobs)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    require(done.returncode == 0, f"benchmarks.instructions failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# ------------------------------------------------------------------ 7 storage and memory


def storage_and_memory(
    args: argparse.Namespace, prefix: str, redis: Redis, logs: Path
) -> dict[str, Any]:
    """Bytes in Redis per entry against body size; the web process's RSS over many keys."""
    st_prefix = f"{prefix}-st"
    env = process_env(
        BENCH_PREFIX=prefix,
        BENCH_REDIS_URL=args.redis_url,
        ASGI_WORKER_REDIS_URL=args.redis_url,
        ASGI_WORKER_PREFIX=st_prefix,
    )
    spec = APPS[AW_HIT][0]
    out: dict[str, Any] = {"entries": {}}
    with serve("storage-web", spec, env, logs, probe="/trivial?probe") as server:
        rss_start = rss_kib(server.pid)
        sizes = {"1 KiB": 1024, "100 KiB": 102_400}
        for size in sizes.values():
            status, _, _ = http_get(server.url(f"/blob?size={size}"))
            require(status == 202, f"storage: first GET gave {status}")
        run_burst_worker(env, logs, "storage-worker")
        found: dict[int, str] = {}
        for key in redis.scan_iter(match=f"{st_prefix}:*:resp"):
            found[len(decode_response(redis.get(key)).body)] = key.decode()  # type: ignore[arg-type]
        for label, size in sizes.items():
            status, _, body = http_get(server.url(f"/blob?size={size}"))
            require(status == 200 and len(body) == size, f"storage: {status}, {len(body)} bytes")
            key = found[size]
            entry = decode_response(redis.get(key))  # type: ignore[arg-type]
            header_bytes = sum(len(name) + len(value) for name, value in entry.headers)
            measured = entry_size(redis, key)
            # The same response as a bare msgpack {status, headers, body} blob, for reference.
            ref_key = f"{st_prefix}:reference:{size}"
            redis.set(ref_key, floor_blob(entry.body, list(entry.headers)))
            reference = entry_size(redis, ref_key)
            out["entries"][label] = {
                "body": size,
                "header_bytes": header_bytes,
                "headers": len(entry.headers),
                **measured,
                "overhead_strlen": measured["strlen"] - size - header_bytes,
                "overhead_memory_usage": measured["memory_usage"] - size - header_bytes,
                "reference_blob": reference,
            }

        keys = args.keys
        log(f"memory: {keys} distinct cold URLs through the web process")
        misses = asyncio.run(get_many(server.base_url, (f"/trivial?m={i}" for i in range(keys))))
        require(misses.counts == {202: keys}, f"memory: expected 202s, got {misses.counts}")
        rss_misses = rss_kib(server.pid)
        worker_seconds = run_burst_worker(env, logs, "memory-worker")
        hits = asyncio.run(get_many(server.base_url, (f"/trivial?m={i}" for i in range(keys))))
        require(hits.counts == {200: keys}, f"memory: expected 200s, got {hits.counts}")
        rss_hits = rss_kib(server.pid)
        out["memory"] = {
            "keys": keys,
            "rss_start_kib": rss_start,
            "rss_after_misses_kib": rss_misses,
            "rss_after_hits_kib": rss_hits,
            "misses_per_second": keys / misses.seconds,
            "hits_per_second": keys / hits.seconds,
            "cli_burst_worker_seconds": worker_seconds,
        }
    return out


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="asgi-worker benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="~1-2 minutes instead of ~6")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, help="throughput rounds (default 5; quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 8; 3)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per app (default 2; 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--ttr-urls", type=int, help="time-to-ready URLs (default 300; 100)")
    parser.add_argument("--poll-interval", type=float, default=0.001, help="ttr client poll (s)")
    parser.add_argument("--jobs", type=int, help="worker backlog N (default 1500; 500)")
    parser.add_argument("--worker-rounds", type=int, help="worker rounds (default 6; 2)")
    parser.add_argument(
        "--instruction-jobs", type=int, help="jobs per callgrind drain (default 300; 100)"
    )
    parser.add_argument("--keys", type=int, help="distinct keys for memory (default 10000; 2000)")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy profiles where a target is missed (auto), always, or never",
    )
    parser.add_argument("--profile-seconds", type=int, default=8)
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="also put the results into benchmarks/README.md (between its result markers)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("throughput", "ttr", "worker", "storage"),
        help="run only these sections",
    )
    args = parser.parse_args(argv)
    defaults = {
        "rounds": (5, 2),
        "duration": (8.0, 3.0),
        "warmup": (2.0, 1.0),
        "ttr_urls": (300, 100),
        "jobs": (1500, 500),
        "worker_rounds": (6, 2),
        "instruction_jobs": (300, 100),
        "keys": (10_000, 2000),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    logs = RAW / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    prefix = f"awbench-{uuid.uuid4().hex[:10]}"
    redis = Redis.from_url(args.redis_url)
    redis.ping()
    sections = set(args.only or ("throughput", "ttr", "worker", "storage"))
    results: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
        "machine": report.machine(redis, ROOT),
        "prefix": prefix,
        "wrk": wrk_available(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("only", "update_readme")},
    }
    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("throughput", "1-4 throughput", lambda: throughput(args, prefix, redis, logs)),
        ("ttr", "5 time-to-ready", lambda: time_to_ready(args, prefix, logs)),
        (
            "worker",
            "6 worker throughput",
            lambda: {
                **worker_throughput(args, prefix, rounds=args.worker_rounds),
                "instructions": worker_instructions(args),
            },
        ),
        ("storage", "7 storage and memory", lambda: storage_and_memory(args, prefix, redis, logs)),
    ]
    try:
        for key, title, step in steps:
            if key in sections:
                log(f"{title}: start")
                results[key] = step()
                log(f"{title}: done")
        worker_ratio = report.worker_ratio(results)
        if "worker" in results and (
            args.profile == "always" or (args.profile == "auto" and worker_ratio < 0.7)
        ):
            log("6 worker throughput: profiling one round of each with py-spy")
            profiled = worker_throughput(args, prefix, rounds=0, profile=True)
            results["worker"]["profiles"] = profiled["profiles"]
    finally:
        deleted = delete_prefix(redis, prefix)
        log(f"deleted this run's {deleted} Redis keys ({prefix}*)")
        redis.close()
    results["seconds"] = time.perf_counter() - started
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown(results)
    (RESULTS / "results.md").write_text(table)
    if "throughput" in results:
        report.plot(results, RESULTS / "requests_per_second.png")
    if args.update_readme:
        report.update_readme(ROOT / "benchmarks" / "README.md", table)
    print(table)
    log(f"total {results['seconds']:.0f}s; results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
