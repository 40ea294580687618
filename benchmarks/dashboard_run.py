"""A real run, scraped by a real Prometheus, drawn with the dashboard's own queries.

    python -m benchmarks.dashboard_run [--seconds 150] [--out docs/grafana/dashboard.png]

Needs Debian's `prometheus` (`apt-get install prometheus`), matplotlib and a Redis
(`--redis-url`, default `redis://127.0.0.1:6379/0`; only keys under a fresh prefix are
written, and deleted at the end). It starts uvicorn with two processes in
prometheus-client's multiprocess mode (`tests/e2e_app.py`, `metrics` on, a 0.1 s near
cache), one
`asgi-worker worker --metrics-port`, and a Prometheus scraping both every 2 s (scrape
jobs `asgi-worker-web` and `asgi-worker-worker`, the dashboard's defaults). It drives a
mixed load (hot URLs, cold URLs and their polls, `Prefer: wait`, POSTs, and a burst of
slow jobs that fills the queue), then asks Prometheus's HTTP API (`query_range`) for
every query of `docs/grafana/asgi-worker.json` and draws each panel with matplotlib.

This is not Grafana (not installable here: no Debian package, nothing on PyPI or npm):
it is a rendering of the dashboard's PromQL over a real scrape of a real run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "asgi-worker.json"
STEP = 2


def wait_http(url: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {seconds} s")


async def load(base: str, seconds: float) -> None:
    """Hot URLs, cold URLs and their polls, Prefer: wait, POSTs, and a burst at 40 %."""
    began = time.monotonic()
    cold = 0
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        pending: set[asyncio.Task[Any]] = set()
        burst_done = False
        while (elapsed := time.monotonic() - began) < seconds:
            phase = elapsed / seconds
            rate = 25 if 0.2 < phase < 0.8 else 10  # requests per tick (0.1 s)
            for _ in range(rate):
                choice = random.random()
                if choice < 0.75:
                    url = f"/slow?hot={random.randrange(30)}"
                    pending.add(asyncio.create_task(http.get(url)))
                elif choice < 0.85:
                    cold += 1
                    url = f"/slow?cold={cold}"
                    for delay in (0, 0.1, 0.5):  # a first request, then polls
                        pending.add(asyncio.create_task(_later(http, url, delay)))
                elif choice < 0.92:
                    cold += 1
                    headers = {"prefer": "wait=3"}
                    url = f"/hang?seconds=0.2&cold={cold}"
                    pending.add(asyncio.create_task(http.get(url, headers=headers)))
                else:
                    pending.add(asyncio.create_task(http.post("/items", content=b"x")))
            if not burst_done and phase > 0.4:
                burst_done = True  # 200 one-second jobs: the queue fills, then drains
                for n in range(200):
                    pending.add(asyncio.create_task(http.get(f"/hang?seconds=1&burst={n}")))
            await asyncio.sleep(0.1)
            pending = {task for task in pending if not task.done()}
        await asyncio.gather(*pending, return_exceptions=True)


async def _later(http: httpx.AsyncClient, url: str, delay: float) -> None:
    await asyncio.sleep(delay)
    await http.get(url)


def query_range(prometheus: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{prometheus}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": STEP},
        timeout=30,
    )
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def render(prometheus: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    variables = {"$web": "asgi-worker-web", "$worker": "asgi-worker-worker"}
    panels = dashboard["panels"]
    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.1 * rows))
    for axis, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "10s")
            for name, value in variables.items():
                expr = expr.replace(name, value)
            for series in query_range(prometheus, expr, start, end):
                label = target["legendFormat"]
                for key, value in series["metric"].items():
                    label = label.replace("{{" + key + "}}", value)
                points = [(float(t) - start, float(v)) for t, v in series["values"]]
                points = [(t, v) for t, v in points if v == v]  # NaN: no data at that step
                if points:
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, label=label, linewidth=1.2)
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("seconds into the run", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.text(
            1.0,
            1.02,
            panel["fieldConfig"]["defaults"]["unit"],
            fontsize=7,
            transform=axis.transAxes,
            ha="right",
            color="grey",
        )
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="upper left")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(
        "asgi-worker dashboard queries (docs/grafana/asgi-worker.json) over a real run, "
        "scraped by Prometheus; drawn with matplotlib, not Grafana",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "grafana" / "dashboard.png")
    arguments = parser.parse_args()
    prometheus_binary = shutil.which("prometheus")
    if prometheus_binary is None:
        raise SystemExit("needs Prometheus: apt-get install prometheus")
    prefix = f"awdash-{uuid.uuid4().hex[:8]}"
    web_port, worker_port, prometheus_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / "multiproc").mkdir()
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_")}
        base_env.update(
            ASGI_WORKER_REDIS_URL=arguments.redis_url,
            ASGI_WORKER_PREFIX=prefix,
            ASGI_WORKER_TTL="20",
            ASGI_WORKER_EXCLUDE="/health",
            PYTHONPATH=str(ROOT),
        )
        web_env = {
            **base_env,
            "ASGI_WORKER_METRICS": "true",
            "ASGI_WORKER_NEAR_CACHE_TTL": "0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(work / "multiproc"),
        }
        (work / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {STEP}s\n"
            "scrape_configs:\n"
            f"  - job_name: asgi-worker-web\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{web_port}']\n"
            f"  - job_name: asgi-worker-worker\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{worker_port}']\n"
        )
        logs = work / "logs"
        logs.mkdir()
        commands = {
            "web": (
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "tests.e2e_app:app",
                    "--port",
                    str(web_port),
                    "--workers",
                    "2",
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                web_env,
            ),
            "worker": (
                [
                    str(Path(sys.executable).parent / "asgi-worker"),
                    "worker",
                    "tests.e2e_app:app",
                    "--metrics-port",
                    str(worker_port),
                    "--metrics-host",
                    "127.0.0.1",
                ],
                base_env,
            ),
            "prometheus": (
                [
                    prometheus_binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                base_env,
            ),
        }
        running = []
        try:
            for name, (command, env) in commands.items():
                handle = (logs / f"{name}.log").open("wb")
                running.append(
                    subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=handle)
                )
            base = f"http://127.0.0.1:{web_port}"
            prometheus = f"http://127.0.0.1:{prometheus_port}"
            wait_http(f"{base}/health")
            wait_http(f"http://127.0.0.1:{worker_port}/metrics")
            wait_http(f"{prometheus}/-/ready")
            start = time.time()
            asyncio.run(load(base, arguments.seconds))
            time.sleep(3 * STEP)  # the last scrapes
            end = time.time()
            render(prometheus, start, end, arguments.out)
            print(f"wrote {arguments.out}")
        finally:
            for process in running:
                process.terminate()
            for process in running:
                process.wait(timeout=10)
            for name in commands:
                print(f"--- {name} log (tail)")
                print((logs / f"{name}.log").read_text(errors="replace")[-1500:])
            import redis

            client = redis.Redis.from_url(arguments.redis_url)
            for pattern in (f"{prefix}*", f"arq:*{prefix}*"):
                for key in client.scan_iter(match=pattern, count=1000):
                    client.delete(key)


if __name__ == "__main__":
    main()
