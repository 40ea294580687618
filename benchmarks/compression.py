"""What storing gzip once costs and saves, against storing as sent and `GZipMiddleware`.

    .venv/bin/python -m benchmarks.compression [--rounds 3] [--seconds 5]

A ~121 KB JSON report (`REPORT`, gzip makes it about a tenth) is served by four
uvicorn processes, each Starlette behind `WorkerMiddleware` on Redis (jobs in process,
`ttl` 1 h, so every request of a load is a hit), each on a prefix of its own:

- `stored-gzip`: `compress=True` (the default): stored gzipped once;
- `stored-gzip-decoding`: the same with `decoded_bodies_bytes=0`: an identity client's
  hit decodes the gzip every time, where `stored-gzip` keeps it decoded 10 s;
- `stored-plain`: `compress=False`: stored as the app sent it, as before;
- `gzip-outside`: `compress=False` and Starlette's `GZipMiddleware` outside the cache,
  which compresses every hit again (its default level, 9, as `compress_level`'s).

It measures, in one run: `MEMORY USAGE` of the stored entry of each; with `wrk -t1 -c16`,
hits/s and the web process's CPU per hit for gzip clients (`Accept-Encoding: gzip`) of
`stored-gzip` against `gzip-outside` and against `stored-plain` (which sends them the
whole report), and for identity clients (no `Accept-Encoding`:
they get the stored gzip decoded) of `stored-gzip` and `stored-gzip-decoding` against
`stored-plain`. The
loads are interleaved and their order rotates every round; the ratios are per round, then
the median (min-max). Also, in this process, what one store and one decode cost for the
levels and codings considered (gzip 1, 6, 9; brotli 5 and 11 if installed). Writes
benchmarks/results/compression.json; prints the Markdown table of docs/compression.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.core.encodings import gunzip, gzip

from .load import run_load, wrk_available
from .servers import ROOT, Server, cpu_seconds, process_env, serve

MODES = ("stored-gzip", "stored-gzip-decoding", "stored-plain", "gzip-outside")
GZIP_CLIENT = "Accept-Encoding: gzip"


def _report() -> bytes:
    """A sales report as an API sends it: about 121 KB of compact JSON rows."""
    regions = ("north", "south", "east", "west", "central")
    states = ("paid", "open", "late", "refunded")
    rows = [
        {
            "id": 100_000 + n,
            "customer": f"customer-{(n * 7919) % 1000:04d}",
            "region": regions[n % 5],
            "total": round((n * 1337.77) % 5000, 2),
            "items": (n * 31) % 23 + 1,
            "status": states[(n * 3) % 4],
            "created": f"2026-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00Z",
        }
        for n in range(818)
    ]
    return json.dumps({"report": "sales", "currency": "EUR", "rows": rows}).encode()


REPORT = _report()


async def report(request: Request) -> Response:
    """The benchmarked endpoint."""
    return Response(REPORT, media_type="application/json")


async def health(request: Request) -> Response:
    """Readiness probe (excluded from the cache)."""
    return PlainTextResponse("ok")


def create_app(mode: str, config: Config) -> Starlette:
    """The app of one mode (see the module's docstring)."""
    app = Starlette(routes=[Route("/report", report), Route("/health", health)])
    app.add_middleware(WorkerMiddleware, config=config)
    if mode == "gzip-outside":
        app.add_middleware(GZipMiddleware)
    return app


def _app_from_env() -> Starlette | None:
    # Built only in the uvicorn processes this benchmark starts (they set the mode).
    mode = os.environ.get("BENCH_COMPRESSION_MODE")
    return None if mode is None else create_app(mode, Config.from_env())


app = _app_from_env()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if not wrk_available():
        raise SystemExit("this benchmark needs wrk: apt-get install -y wrk")
    results = run(args.redis_url, args.rounds, args.seconds, args.connections)
    out = ROOT / "benchmarks" / "results" / "compression.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n(every figure: {out.relative_to(ROOT)})")


def run(redis_url: str, rounds: int, seconds: float, connections: int) -> dict[str, Any]:
    """Serve the four modes, store the report in each, measure; every figure."""
    run_id = f"awbench-{uuid.uuid4().hex[:8]}"
    logs = ROOT / "benchmarks" / "results" / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(redis_url)
    try:
        with ExitStack() as stack:
            servers = {
                mode: stack.enter_context(_server(mode, f"{run_id}-{mode}", redis_url, logs))
                for mode in MODES
            }
            for server in servers.values():
                _until_stored(server)
            memory = {mode: _memory_usage(client, f"{run_id}-{mode}") for mode in MODES}
            loads = _loads(servers, rounds, seconds, connections)
    finally:
        for key in client.scan_iter(match=f"{run_id}*", count=1000):
            client.delete(key)
        client.close()
    return {
        "report_bytes": len(REPORT),
        "memory_usage": memory,
        "loads": loads,
        "ratios": _ratios(loads),
        "codings": codings(),
        "wrk": f"wrk -t1 -c{connections} -d{round(seconds)}s",
        "rounds": rounds,
    }


def _server(mode: str, prefix: str, redis_url: str, logs: Path) -> Any:
    env = process_env(
        BENCH_COMPRESSION_MODE=mode,
        ASGI_WORKER_PREFIX=prefix,
        ASGI_WORKER_REDIS_URL=redis_url,
        ASGI_WORKER_INLINE_WORKER="true",
        ASGI_WORKER_TTL="3600",
        ASGI_WORKER_EXCLUDE="/health",
        ASGI_WORKER_COMPRESS="true" if mode.startswith("stored-gzip") else "false",
        ASGI_WORKER_DECODED_BODIES_BYTES="0" if mode == "stored-gzip-decoding" else "16777216",
    )
    return serve(mode, "benchmarks.compression:app", env, logs)


def _until_stored(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(server.url("/report"), timeout=5) as response:
            if response.status == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{server.name}: /report was never stored")


def _memory_usage(client: redis.Redis, prefix: str) -> int:
    keys = list(client.scan_iter(match=f"{prefix}:*:resp", count=1000))
    assert len(keys) == 1, keys
    usage = client.memory_usage(keys[0], samples=0)
    assert isinstance(usage, int)
    return usage


_LOADS = (
    ("gzip", "stored-gzip", GZIP_CLIENT),
    ("gzip", "gzip-outside", GZIP_CLIENT),
    ("gzip", "stored-plain", GZIP_CLIENT),
    ("identity", "stored-gzip", None),
    ("identity", "stored-gzip-decoding", None),
    ("identity", "stored-plain", None),
)


def _loads(
    servers: dict[str, Server], rounds: int, seconds: float, connections: int
) -> list[dict[str, Any]]:
    """Every load of every round: hits/s and the web process's CPU per hit."""
    done = []
    for _client, mode, header in _LOADS:  # warm-up, not counted
        _load(servers[mode], 1.0, connections, header)
    for number in range(rounds):
        shift = number % len(_LOADS)
        for client, mode, header in _LOADS[shift:] + _LOADS[:shift]:
            figures = _load(servers[mode], seconds, connections, header)
            done.append({"round": number, "client": client, "mode": mode, **figures})
    return done


def _load(server: Server, seconds: float, connections: int, header: str | None) -> dict[str, float]:
    before = cpu_seconds(server.pid) or 0.0
    result = run_load(
        server.url("/report"),
        seconds=seconds,
        connections=connections,
        headers=() if header is None else (header,),
    )
    used = (cpu_seconds(server.pid) or 0.0) - before
    assert result.errors == 0, f"{server.name}: {result.errors} errors"
    return {
        "hits_per_second": round(result.requests_per_second, 1),
        "cpu_us_per_hit": round(used / max(1, result.requests) * 1e6, 1),
    }


def _ratios(loads: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per round, `ours / theirs` of hits/s and of CPU per hit; median, min, max."""
    pairs = {
        "gzip clients: stored-gzip / gzip-outside": ("gzip", "stored-gzip", "gzip-outside"),
        "gzip clients: stored-gzip / stored-plain": ("gzip", "stored-gzip", "stored-plain"),
        "identity clients: stored-gzip / stored-plain": (
            "identity",
            "stored-gzip",
            "stored-plain",
        ),
        "identity clients: stored-gzip-decoding / stored-plain": (
            "identity",
            "stored-gzip-decoding",
            "stored-plain",
        ),
    }
    ratios = {}
    for name, (client, ours, theirs) in pairs.items():
        for figure in ("hits_per_second", "cpu_us_per_hit"):
            values = [
                _one(loads, number, client, ours)[figure]
                / _one(loads, number, client, theirs)[figure]
                for number in sorted({load["round"] for load in loads})
            ]
            ratios[f"{name}, {figure}"] = {
                "median": round(statistics.median(values), 2),
                "min": round(min(values), 2),
                "max": round(max(values), 2),
            }
    return ratios


def _one(loads: list[dict[str, Any]], number: int, client: str, mode: str) -> dict[str, Any]:
    return next(
        load
        for load in loads
        if (load["round"], load["client"], load["mode"]) == (number, client, mode)
    )


def codings() -> list[dict[str, Any]]:
    """One store (compress) and one hit's decode of `REPORT` for each coding considered."""
    candidates: list[tuple[str, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = [
        (f"gzip {level}", _gzipper(level), _gunzip) for level in (1, 6, 9)
    ]
    try:
        import brotli  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        for quality in (5, 11):
            candidates.append((f"br {quality}", _brotli(brotli, quality), brotli.decompress))
    return [_measured(name, compress, decompress) for name, compress, decompress in candidates]


def _measured(
    name: str, compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes]
) -> dict[str, Any]:
    coded = compress(REPORT)
    assert decompress(coded) == REPORT
    return {
        "coding": name,
        "bytes": len(coded),
        "share": round(len(coded) / len(REPORT), 3),
        "compress_ms": round(_best(lambda: compress(REPORT)) * 1000, 2),
        "decode_us": round(_best(lambda: decompress(coded)) * 1e6, 1),
    }


def _gzipper(level: int) -> Callable[[bytes], bytes]:
    return lambda body: gzip(body, level)


def _gunzip(data: bytes) -> bytes:
    return gunzip(data, len(REPORT))


def _brotli(module: Any, quality: int) -> Callable[[bytes], bytes]:
    return lambda body: bytes(module.compress(body, quality=quality))


def _best(step: Callable[[], object], repeat: int = 5) -> float:
    """The fastest of `repeat` timings of `step` (each long enough to time), in seconds."""
    times = []
    for _ in range(repeat):
        runs, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < 0.05 or runs == 0:
            step()
            runs += 1
        times.append(elapsed / runs)
    return min(times)


def table(results: dict[str, Any]) -> str:
    """The results as the Markdown of docs/compression.md#measured."""
    memory = results["memory_usage"]
    lines = [
        f"Report: {results['report_bytes']:,} bytes of JSON; {results['wrk']}, "
        f"{results['rounds']} rounds.",
        "",
        "| | figure |",
        "| --- | --- |",
        f"| Redis `MEMORY USAGE`, stored as sent | {memory['stored-plain']:,} B |",
        f"| Redis `MEMORY USAGE`, stored gzipped | {memory['stored-gzip']:,} B "
        f"({memory['stored-gzip'] / memory['stored-plain']:.3f}x) |",
    ]
    for name, ratio in results["ratios"].items():
        lines.append(f"| {name} | {ratio['median']}x ({ratio['min']}-{ratio['max']}) |")
    lines += [
        "",
        "| coding | bytes | share | compress (once) | decode (a hit) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for coding in results["codings"]:
        lines.append(
            f"| {coding['coding']} | {coding['bytes']:,} | {coding['share']} | "
            f"{coding['compress_ms']} ms | {coding['decode_us']} µs |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
