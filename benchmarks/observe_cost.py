"""What metrics and tracing cost on the hit path, against neither, in one run.

    python -m benchmarks.observe_cost [--rounds 7] [--requests 20000]

Each variant runs in a fresh interpreter: Starlette behind `WorkerMiddleware` on the
`memory://` backend (no network: what is measured is the middleware's own CPU per hit),
called directly as an ASGI app, `--requests` hits of one prewarmed URL per batch, the
median batch kept. Variants:

- `off`: neither metrics nor tracing (the default): the baseline;
- `observed`: an observer that does nothing (`NoObserver`): what any observer costs the
  middleware (its measured request path), before the observer's own work;
- `metrics`: `Config(metrics=True)` (prometheus-client, in-process registry);
- `tracing`: `Config(tracing=True)` with the OpenTelemetry SDK's `TracerProvider` and no
  exporter (every span is created, sampled and ended, then dropped);
- `dashboard`: `Config(dashboard_counts=True)`: the per-minute counts of the ops
  dashboard (in process on `memory://`; on Redis the same counting, plus one write a
  second by a task of its own, off the request's path).

The variants run interleaved, the order rotating every round; the report is the median
per variant over the rounds and its ratio to `off`. (Against the code before observers
existed, the figures are in docs/metrics.md; that comparison is not rerun.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("off", "observed", "metrics", "tracing", "dashboard")


async def measure(variant: str, requests: int, batches: int) -> float:
    """Nanoseconds per hit (median batch) for one variant, in this interpreter."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    from asgi_worker import Config, WorkerMiddleware
    from asgi_worker.testing import run_pending

    settings: dict[str, Any] = {"redis_url": "memory://", "ttl": 3600}
    if variant == "metrics":
        settings["metrics"] = True
    elif variant == "dashboard":
        settings["dashboard_counts"] = True
    elif variant == "tracing":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        trace.set_tracer_provider(TracerProvider())
        settings["tracing"] = True

    async def item(request: Request) -> Response:
        return PlainTextResponse("x" * 1024)

    app = Starlette(routes=[Route("/item/{id}", item)])
    if variant == "observed":
        from asgi_worker.observability.observer import NoObserver

        app.add_middleware(WorkerMiddleware, config=Config(**settings), observer=NoObserver())
    else:
        app.add_middleware(WorkerMiddleware, config=Config(**settings))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/item/1",
        "raw_path": b"/item/1",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(dict(scope), receive, send)
    await run_pending(app)
    timings = []
    for _ in range(batches):
        statuses.clear()
        began = time.process_time_ns()
        for _ in range(requests):
            await app(dict(scope), receive, send)
        timings.append((time.process_time_ns() - began) / requests)
        assert set(statuses) == {200}, f"not every request was a hit: {set(statuses)}"
    return statistics.median(timings)


def run_child(variant: str, requests: int) -> float:
    command = [sys.executable, "-m", "benchmarks.observe_cost", "--child", variant]
    command += ["--requests", str(requests)]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(asyncio.run(measure(arguments.child, arguments.requests, batches=5)))
        return
    results: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_number in range(arguments.rounds):
        shift = round_number % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            results[variant].append(run_child(variant, arguments.requests))
    print(f"hit path, memory:// backend, ns per request (median of {arguments.rounds} rounds)")
    reference = statistics.median(results["off"])
    for variant, values in results.items():
        median = statistics.median(values)
        print(
            f"  {variant:8} {median:9.0f} ns  x{median / reference:.3f} of off  "
            f"(+{median - reference:.0f} ns; rounds {min(values):.0f}-{max(values):.0f})"
        )


if __name__ == "__main__":
    main()
