"""What a large body costs: the worker's memory, the web process's, and the small requests.

    .venv/bin/python -m benchmarks.big_bodies [--size-mb 100] [--hits 6]

One body of `--size-mb` (the `/blob` endpoint of benchmarks/apps.py, one `bytes` object
sent whole) is stored and served twice in the same run, each time by a fresh uvicorn and
a fresh `asgi-worker worker` on their own prefix:

- `whole`: `stream_body_bytes` above the body: it is stored whole in its entry, as every
  body was before bodies were stored apart (the baseline);
- `apart`: the default `stream_body_bytes` (1 MiB): stored apart and streamed.

For each: the worker's peak RSS growth while it stores the body (`VmHWM` reset through
/proc/<pid>/clear_refs before the job, minus `VmRSS` then); the web process's peak RSS
growth while `--hits` clients each GET the body at once (read as it comes, 1 MiB at a
time); and meanwhile one client's small hits (a 1 KiB body, prewarmed) one after the
other: their latency, against the same small hits with nothing else going on. Memory is
given in MiB and as a ratio of the body's size. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .servers import ROOT, Server, process_env, rss_kib, serve, worker

MIB = 1024 * 1024
_READ = MIB  # what a client reads at a time


@dataclass
class Outcome:
    """The figures of one mode."""

    mode: str
    body_mib: float
    worker_peak_mib: float = 0.0
    web_peak_mib: float = 0.0
    hits_seconds: float = 0.0
    small_ms: list[float] = field(default_factory=list, repr=False)
    idle_small_ms: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float | str]:
        """The figures, ratios of the body's size included."""
        return {
            "mode": self.mode,
            "worker_peak_mib": round(self.worker_peak_mib, 1),
            "worker_peak_x_body": round(self.worker_peak_mib / self.body_mib, 2),
            "web_peak_mib": round(self.web_peak_mib, 1),
            "web_peak_x_body": round(self.web_peak_mib / self.body_mib, 2),
            "hits_seconds": round(self.hits_seconds, 2),
            "small_idle_p50_ms": _quantile(self.idle_small_ms, 0.5),
            "small_p50_ms": _quantile(self.small_ms, 0.5),
            "small_p99_ms": _quantile(self.small_ms, 0.99),
            "small_max_ms": round(max(self.small_ms, default=0.0), 1),
        }


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return round(values[0], 1) if values else 0.0
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 1)


def _peak_kib(pid: int) -> int:
    """`VmHWM` of `pid`: its peak RSS since the last `_reset_peak`."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _get(port: int, path: str, method: str = "GET") -> tuple[int, int]:
    """One request on a connection of its own, the body read and dropped: (status, bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        received = 0
        while piece := response.read(_READ):
            received += len(piece)
        return response.status, received
    finally:
        connection.close()


def _until_stored(port: int, path: str) -> None:
    """GET `path` until it is a hit (HEAD: the web process never reads a body apart)."""
    deadline = time.monotonic() + 120
    while _get(port, path, "HEAD")[0] != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} was never stored")
        time.sleep(0.05)


def _small_hits(port: int, stop: threading.Event, latencies: list[float]) -> None:
    """Small hits one after the other on one keep-alive connection, until `stop`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while not stop.is_set():
            began = time.perf_counter()
            connection.request("GET", "/item")
            response = connection.getresponse()
            response.read()
            assert response.status == 200, response.status
            latencies.append((time.perf_counter() - began) * 1000)
    finally:
        connection.close()


def run_mode(mode: str, size: int, hits: int, redis_url: str, logs: Path) -> Outcome:
    prefix = f"awbench-big-{uuid.uuid4().hex[:8]}"
    stream = size + 1 if mode == "whole" else MIB
    env = process_env(
        ASGI_WORKER_REDIS_URL=redis_url,
        ASGI_WORKER_PREFIX=prefix,
        ASGI_WORKER_EXCLUDE="/health",
        ASGI_WORKER_TTL="3600",
        ASGI_WORKER_MAX_BODY_BYTES=str(2 * size),
        ASGI_WORKER_STREAM_BODY_BYTES=str(stream),
        ASGI_WORKER_JOB_TIMEOUT="120",
    )
    out = Outcome(mode, size / MIB)
    big = f"/blob?size={size}"
    try:
        with (
            serve(f"web-{mode}", "benchmarks.apps:asgi_worker_app", env, logs) as web,
            worker(env, logs, name=f"worker-{mode}") as worker_process,
        ):
            _get(web.port, "/item")
            _until_stored(web.port, "/item")
            time.sleep(1.0)  # the worker settled after its first job
            before = rss_kib(worker_process.pid)
            _reset_peak(worker_process.pid)
            _until_stored(web.port, big)
            out.worker_peak_mib = (_peak_kib(worker_process.pid) - before) / 1024
            _measure_web(web, big, size, hits, out)
    finally:
        client = redis.Redis.from_url(redis_url)
        for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
            for key in client.scan_iter(match=pattern, count=1000):
                client.delete(key)
        client.close()
    return out


def _measure_web(web: Server, big: str, size: int, hits: int, out: Outcome) -> None:
    """The web process's peak under `hits` concurrent GETs of `big`, and the small hits."""
    stop = threading.Event()
    idle = threading.Thread(target=_small_hits, args=(web.port, stop, out.idle_small_ms))
    idle.start()
    time.sleep(2.0)
    stop.set()
    idle.join()
    before = rss_kib(web.pid)
    _reset_peak(web.pid)
    stop = threading.Event()
    small = threading.Thread(target=_small_hits, args=(web.port, stop, out.small_ms))
    results: list[tuple[int, int]] = []
    clients = [
        threading.Thread(target=lambda: results.append(_get(web.port, big))) for _ in range(hits)
    ]
    small.start()
    began = time.perf_counter()
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    out.hits_seconds = time.perf_counter() - began
    stop.set()
    small.join()
    out.web_peak_mib = (_peak_kib(web.pid) - before) / 1024
    if results != [(200, size)] * hits:
        raise RuntimeError(f"the big hits did not all get the body: {results}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="the body, in MiB")
    parser.add_argument("--hits", type=int, default=6, help="concurrent GETs of the body")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "big_bodies.json"
    )
    args = parser.parse_args()
    size = int(args.size_mb * MIB)
    logs = ROOT / "benchmarks" / "results" / "raw" / "big_bodies"
    logs.mkdir(parents=True, exist_ok=True)
    modes = ("whole", "apart")
    outcomes = [run_mode(mode, size, args.hits, args.redis_url, logs) for mode in modes]
    rows = [outcome.summary() for outcome in outcomes]
    columns = list(rows[0])
    print(f"body {args.size_mb:g} MiB, {args.hits} concurrent hits")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[name]) for name in columns) + " |")
    summary = {"size_mib": args.size_mb, "hits": args.hits, "modes": rows}
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
