"""Hits on a 3-master Redis Cluster against one Redis, in the same run.

    .venv/bin/python -m benchmarks.cluster [--seconds 5] [--rounds 3] [--paths 200]

Starts its own servers in a temporary folder (no persistence): one `redis-server` and a
Cluster of 3 masters (`redis-cli --cluster create`, no replicas). For each, the same app
(a 1 KiB body behind `WorkerMiddleware`, `coalesce=False` so that every request is one
lookup script, no near cache) is filled with `--paths` paths x 5 query strings through a
real arq worker (queue on the single Redis), then driven in this process by 64 concurrent
ASGI callers, each request a hit on a URL drawn at random from the mix, for `--seconds`.
The rounds alternate between the two; the medians are reported.

Measured: hits/s (the client process is the bottleneck: this is its cost per hit), and
the Redis CPU per hit (`used_cpu_user` + `used_cpu_sys` from `INFO cpu`, summed over the
nodes, per hit). Ratios cluster / single, not absolute times, are the result. Also the
spread of the keys over the masters for the mix, and for one hot path (all its keys share
its hash tag: one slot, one master).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.testing import run_pending

from .worker_bench import _asgi_get as asgi_get  # one GET, in process

QUERIES = 5
CALLERS = 64
BODY = "x" * 1024
HOT = [f"/hot/item?q={q}" for q in range(200)]
RESULTS = Path(__file__).parent / "results" / "cluster.json"


def _port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + 10_000 < 65536:
            return port


@contextmanager
def servers(directory: Path) -> Iterator[tuple[list[int], list[int]]]:
    """([the single Redis's port], [the 3 masters' ports]), all stopped afterwards."""
    single, masters = [_port()], [_port() for _ in range(3)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in single + masters:
            arguments = ["--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            arguments += ["--appendonly", "no", "--dir", str(directory)]
            if port in masters:
                arguments += ["--cluster-enabled", "yes"]
                arguments += ["--cluster-config-file", f"nodes-{port}.conf"]
            processes.append(
                subprocess.Popen(["redis-server", *arguments], stdout=subprocess.DEVNULL)
            )
        for port in single + masters:
            _wait(lambda port=port: redis.Redis(port=port).ping())  # type: ignore[misc]
        create = ["redis-cli", "--cluster", "create", "--cluster-yes"]
        create += [f"127.0.0.1:{port}" for port in masters]
        subprocess.run(create, check=True, capture_output=True)
        _wait(lambda: redis.Redis(port=masters[0]).cluster("info")["cluster_state"] == "ok")
        yield single, masters
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def _wait(ready: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server not ready")
        time.sleep(0.05)


def build_app(config: Config) -> Starlette:
    async def item(request: Request) -> Response:
        return PlainTextResponse(BODY)

    app = Starlette(routes=[Route("/{path:path}", item)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


def url_mix(paths: int) -> list[str]:
    return [f"/p{p}/item?q={q}" for p in range(paths) for q in range(QUERIES)]


async def call(app: Starlette, url: str) -> int:
    path, _, query = url.partition("?")
    return await asgi_get(app, path, query)


async def fill(app: Starlette, urls: list[str]) -> None:
    for start in range(0, len(urls), 200):
        await asyncio.gather(*(call(app, url) for url in urls[start : start + 200]))
        await run_pending(app)
    statuses = await asyncio.gather(*(call(app, url) for url in urls))
    assert set(statuses) == {200}, "not every URL is a hit"


def redis_cpu(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        info = redis.Redis(port=port).info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


async def drive(
    app: Starlette, urls: list[str], seconds: float, ports: list[int]
) -> dict[str, float]:
    done = 0
    stop = time.monotonic() + seconds

    async def caller(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.monotonic() < stop:
            assert await call(app, rng.choice(urls)) == 200
            done += 1

    cpu_before = redis_cpu(ports)
    began = time.perf_counter()
    await asyncio.gather(*(caller(seed) for seed in range(CALLERS)))
    elapsed = time.perf_counter() - began
    cpu = redis_cpu(ports) - cpu_before
    return {"hits_per_s": done / elapsed, "redis_cpu_us_per_hit": cpu / done * 1e6}


def spread(masters: list[int], prefix: str) -> list[int]:
    """Keys of `prefix` on each master."""
    return [
        sum(1 for _ in redis.Redis(port=port).scan_iter(match=f"{prefix}:*", count=1000))
        for port in masters
    ]


async def main(seconds: float, rounds: int, paths: int) -> dict[str, Any]:
    urls = url_mix(paths)
    with tempfile.TemporaryDirectory() as folder, servers(Path(folder)) as (single, masters):
        queue = f"redis://127.0.0.1:{single[0]}/0"
        cluster = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in masters) + "/"
        on_cluster = Config(redis_url=cluster, queue_redis_url=queue, coalesce=False)
        targets = {
            "single": (Config(redis_url=queue, prefix="one", coalesce=False), single),
            "cluster": (dataclasses.replace(on_cluster, prefix="many"), masters),
        }
        apps = {name: build_app(config) for name, (config, _) in targets.items()}
        for app in apps.values():
            await fill(app, urls)
        # One hot path with many query strings: all its keys share its hash tag.
        await fill(build_app(dataclasses.replace(on_cluster, prefix="hot")), HOT)
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for _ in range(rounds):
            for name, (_, ports) in targets.items():
                measured[name].append(await drive(apps[name], urls, seconds, ports))
        per_master = spread(masters, "many")
        hot_per_master = spread(masters, "hot")
    medians = {
        name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for name, runs in measured.items()
    }
    return {
        "seconds": seconds,
        "rounds": rounds,
        "urls": len(urls),
        "callers": CALLERS,
        "single": medians["single"],
        "cluster": medians["cluster"],
        "hits_ratio": medians["cluster"]["hits_per_s"] / medians["single"]["hits_per_s"],
        "redis_cpu_ratio": medians["cluster"]["redis_cpu_us_per_hit"]
        / medians["single"]["redis_cpu_us_per_hit"],
        "keys_per_master": per_master,
        "hot_path_keys_per_master": hot_per_master,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", type=int, default=200)
    options = parser.parse_args()
    for needed in ("redis-server", "redis-cli"):
        assert shutil.which(needed), f"{needed} is not installed"
    found = asyncio.run(main(options.seconds, options.rounds, options.paths))
    RESULTS.write_text(json.dumps(found, indent=2) + "\n")
    print(json.dumps(found, indent=2))
