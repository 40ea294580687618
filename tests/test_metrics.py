"""Prometheus metrics (`observability/metrics.py`): what is counted, bounded labels, real processes.

In-process tests drive the middleware and a burst worker on real Redis; the end-to-end
ones run uvicorn with two worker processes in prometheus-client's multiprocess mode, and
`asgi-worker worker --metrics-port`, and scrape them over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from asgi_worker import Config, ConfigurationError, ReplayWorker, WorkerMiddleware, worker_settings
from asgi_worker.core.codec import encode_snapshot
from asgi_worker.core.keys import RequestSnapshot
from asgi_worker.observability.metrics import PrometheusObserver
from asgi_worker.observability.route_labels import OTHER, RouteLabels
from asgi_worker.worker.job import run_job

from .processes import PROJECT, asgi_worker_command, free_port
from .stack import running_stack

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def requests(found: Samples, outcome: str, route: str) -> float:
    return value(found, "asgi_worker_requests_total", outcome=outcome, route=route)


def create_app(config: Config, observer: PrometheusObserver | None = None) -> Starlette:
    async def report(request: Request) -> Response:
        year = request.path_params["year"]
        if year == "boom":
            raise RuntimeError("boom")
        private = {"cache-control": "private"} if year == "mine" else {}
        return PlainTextResponse(f"report {year}", headers=private)

    async def item(request: Request) -> Response:
        return PlainTextResponse("item")

    api = Starlette(routes=[Route("/items/{id:int}", item)])
    app = Starlette(routes=[Route("/reports/{year}", report), Mount("/api", app=api)])
    app.add_middleware(WorkerMiddleware, config=config, observer=observer)
    return app


async def get(app: Starlette, url: str, method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        return await http.request(method, url)


async def burst(app: Starlette, config: Config, observer: PrometheusObserver) -> None:
    settings = worker_settings(app, config, observer=observer)
    worker = ReplayWorker(**settings, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()


async def test_web_and_worker_count_by_outcome_and_route_pattern(
    config: Config, redis: Redis
) -> None:
    config = dataclasses.replace(config, metrics=True)
    app = create_app(config)
    for url in ("/reports/2024", "/reports/2025", "/reports/boom", "/reports/mine"):
        assert (await get(app, url)).status_code == 202
    assert (await get(app, "/reports/2024")).status_code == 202  # queued already
    assert (await get(app, "/api/items/7")).status_code == 202
    assert (await get(app, "/nowhere/at/all")).status_code == 202
    assert (await get(app, "/reports/2024", method="POST")).status_code == 405

    worker_metrics = PrometheusObserver()
    await burst(app, config, worker_metrics)
    assert (await get(app, "/reports/2024")).status_code == 200
    assert (await get(app, "/reports/mine")).headers.get("cache-status") is None  # pass
    assert (await get(app, "/reports/boom")).status_code == 500  # the stored error: a hit

    scrape = await get(app, config.metrics_path)
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    web = samples(scrape.text)
    assert requests(web, "miss-enqueued", "/reports/{year}") == 4
    assert requests(web, "miss-queued", "/reports/{year}") == 1
    assert requests(web, "miss-enqueued", "/api/items/{id:int}") == 1  # through the mount
    assert requests(web, "miss-enqueued", OTHER) == 1
    assert requests(web, "bypass", "/reports/{year}") == 1
    assert requests(web, "hit", "/reports/{year}") == 2
    assert requests(web, "pass", "/reports/{year}") == 1
    assert value(web, "asgi_worker_lookup_seconds_count") == 10  # every request but the POST
    routes = {dict(labels).get("route") for (_, labels) in web} - {None}
    assert routes == {"/reports/{year}", "/api/items/{id:int}", OTHER}  # never a raw path
    # The scrape itself is not cached, nor counted, with credentials too (basic auth).
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        scraped = await http.get(config.metrics_path, auth=("prometheus", "secret"))
    assert scraped.status_code == 200
    assert samples(scraped.text) == web

    jobs = samples(generate_latest(worker_metrics.registry).decode())
    by_outcome: dict[str, float] = {}
    for (name, labels), count in jobs.items():
        if name == "asgi_worker_jobs_total":
            outcome = dict(labels)["outcome"]
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
    assert by_outcome == {"stored": 4, "error": 1, "pass": 1}
    assert value(jobs, "asgi_worker_jobs_total", outcome="stored", route=OTHER) == 1
    assert value(jobs, "asgi_worker_commits_total", result="stored") == 6
    assert value(jobs, "asgi_worker_job_seconds_count", route="/reports/{year}") == 4
    assert value(jobs, "asgi_worker_replay_seconds_count", route="/reports/{year}") == 4


async def test_of_concurrent_misses_sharing_one_lookup_one_is_the_enqueuer(
    config: Config, redis: Redis
) -> None:
    config = dataclasses.replace(config, metrics=True)
    observer = PrometheusObserver()
    app = create_app(config, observer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        answers = await asyncio.gather(*(http.get("/reports/cold") for _ in range(20)))
    assert {answer.status_code for answer in answers} == {202}
    assert await redis.zcard(config.queue) == 1
    found = samples(generate_latest(observer.registry).decode())
    assert requests(found, "miss-enqueued", "/reports/{year}") == 1
    assert requests(found, "miss-queued", "/reports/{year}") == 19
    assert value(found, "asgi_worker_lookup_seconds_count") < 20  # shared lookups


async def test_near_cache_hits_waiting_and_unavailable(config: Config, redis: Redis) -> None:
    config = dataclasses.replace(config, metrics=True, near_cache_ttl=30.0)
    observer = PrometheusObserver()
    app = create_app(config, observer)
    # Under the app's lifespan: the near cache's event listener stops at its shutdown,
    # not when the test's loop is torn down under it.
    async with LifespanManager(app) as manager:
        assert (await get(manager.app, "/reports/1")).status_code == 202
        await burst(app, config, PrometheusObserver())
        for _ in range(4):
            assert (await get(manager.app, "/reports/1")).status_code == 200
    found = samples(generate_latest(observer.registry).decode())
    assert requests(found, "hit", "/reports/{year}") == 4
    assert 1 <= value(found, "asgi_worker_near_cache_hits_total") <= 3  # the first is Redis's
    assert value(found, "asgi_worker_waiting_requests") == 0

    down = dataclasses.replace(config, redis_url="redis://127.0.0.1:1/0", redis_timeout=0.5)
    broken = PrometheusObserver()
    async with LifespanManager(create_app(down, broken)) as manager:
        assert (await get(manager.app, "/reports/1")).status_code == 503
    found = samples(generate_latest(broken.registry).decode())
    assert requests(found, "unavailable", "/reports/{year}") == 1


async def test_requests_held_for_prefer_wait_are_a_gauge(config: Config, redis: Redis) -> None:
    config = dataclasses.replace(config, metrics=True)
    observer = PrometheusObserver()
    app = create_app(config, observer)

    def waiting() -> float:
        return value(
            samples(generate_latest(observer.registry).decode()), "asgi_worker_waiting_requests"
        )

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        held = asyncio.create_task(http.get("/reports/7", headers={"prefer": "wait=5"}))
        deadline = time.monotonic() + 5
        while waiting() != 1:
            assert time.monotonic() < deadline, "the request was never held"
            await asyncio.sleep(0.01)
        await burst(app, config, PrometheusObserver())
        response = await held
    assert response.status_code == 200
    assert waiting() == 0
    found = samples(generate_latest(observer.registry).decode())
    assert requests(found, "waited", "/reports/{year}") == 1


async def test_queue_depth_and_oldest_job_are_read_at_scrape_time(
    config: Config, redis: Redis
) -> None:
    app = create_app(config)
    for year in (1, 2, 3):
        assert (await get(app, f"/reports/{year}")).status_code == 202
    observer = PrometheusObserver()
    observer.watch_queue(redis, config.queue, 2.0)
    # A scrape runs in the metrics server's thread; the queue is read in this loop.
    found = samples((await asyncio.to_thread(generate_latest, observer.registry)).decode())
    assert value(found, "asgi_worker_queue_depth", queue=config.queue) == 3
    assert 0 <= value(found, "asgi_worker_queue_oldest_seconds", queue=config.queue) < 30
    assert value(found, "asgi_worker_queue_up", queue=config.queue) == 1

    ten_minutes_ago = (time.time() - 600) * 1000
    await redis.zadd(config.queue, {f"{config.prefix}:old": ten_minutes_ago})
    found = samples((await asyncio.to_thread(generate_latest, observer.registry)).decode())
    assert 599 < value(found, "asgi_worker_queue_oldest_seconds", queue=config.queue) < 700

    await redis.delete(config.queue)
    found = samples((await asyncio.to_thread(generate_latest, observer.registry)).decode())
    assert value(found, "asgi_worker_queue_depth", queue=config.queue) == 0
    assert value(found, "asgi_worker_queue_oldest_seconds", queue=config.queue) == 0

    # Every metric the dashboard and the docs name is one the observer exports.
    exported = await asyncio.to_thread(lambda: {f.name for f in observer.registry.collect()})
    dashboard = (PROJECT / "docs" / "grafana" / "asgi-worker.json").read_text()
    named = set(re.findall(r"asgi_worker_\w+", dashboard))
    named |= set(re.findall(r"`(asgi_worker_\w+)`", (PROJECT / "docs" / "metrics.md").read_text()))
    unsuffixed = {re.sub(r"_(bucket|total|count|sum)$", "", name) for name in named}
    assert unsuffixed == exported, unsuffixed ^ exported


async def test_a_queue_that_cannot_be_read_is_queue_up_0_not_a_failed_scrape() -> None:
    observer = PrometheusObserver()
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    observer.watch_queue(unreachable, "q", 1.0)
    found = samples((await asyncio.to_thread(generate_latest, observer.registry)).decode())
    assert value(found, "asgi_worker_queue_up", queue="q") == 0
    assert ("asgi_worker_queue_depth", (("queue", "q"),)) not in found
    await unreachable.aclose()


class UnreachableStore:
    """A store whose Redis is gone: the job fails in the worker, not in the app."""

    async def begin(self, digest: str, token: str, path: str) -> float:
        raise ConnectionError("Redis went away")

    async def release(self, digest: str, token: str) -> None:
        raise ConnectionError("Redis went away")


async def test_a_job_that_fails_in_the_worker_itself_is_counted_failed(config: Config) -> None:
    config = dataclasses.replace(config, redis_timeout=0.2)  # how long the job tries
    snapshot = RequestSnapshot(
        scheme="http",
        host="example.com",
        root_path="",
        path="/reports/1",
        raw_path=None,
        query_string=b"",
        headers=(),
    )
    observer = PrometheusObserver()
    app = create_app(config)
    observer.bind(app)
    word = await run_job(
        app,
        UnreachableStore(),  # type: ignore[arg-type]
        config,
        encode_snapshot(snapshot),
        "t",
        observer=observer,
    )
    assert word == "failed (ConnectionError)"
    found = samples(generate_latest(observer.registry).decode())
    assert value(found, "asgi_worker_jobs_total", outcome="failed", route="/reports/{year}") == 1
    assert value(found, "asgi_worker_replay_seconds_count", route="/reports/{year}") == 0


# -- route labels are bounded ------------------------------------------------------------


def test_route_labels_come_from_the_app_else_the_callable_else_other_and_are_capped() -> None:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/users/{id}", endpoint), Mount("/static", app=endpoint)])
    labels = RouteLabels(lambda path: path if path.startswith("/raw/") else None, max_labels=3)
    labels.bind(app)
    assert labels("/users/42") == "/users/{id}"
    assert labels("/static/css/site.css") == "/static/{path:path}"
    assert labels("/elsewhere") == OTHER
    # A callable that gives raw paths is capped: 3 distinct labels in all, then "other".
    given = {labels(f"/raw/{n}") for n in range(1000)}
    assert given == {"/raw/0", OTHER}
    assert labels("/users/43") == "/users/{id}"  # given before the cap: still itself

    def broken(path: str) -> str:
        raise KeyError(path)

    assert RouteLabels(broken)("/x") == OTHER  # a failing callable never fails a request


# -- failure paths ------------------------------------------------------------------------


def test_metrics_without_prometheus_client_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'asgi-worker\[metrics\]'") as error:
        Config(metrics=True)
    assert error.value.field == "metrics"
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'asgi-worker\[otel\]'"):
        Config(tracing=True)
    with pytest.raises(ConfigurationError, match="metrics_path"):
        Config(metrics_path="metrics")


BLOCK_EXTRAS = """
import importlib.abc, sys

class NoExtras(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoExtras())
"""

WITHOUT_EXTRAS = (
    BLOCK_EXTRAS
    + """
import asyncio, httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from asgi_worker import Config, ConfigurationError, WorkerMiddleware
from asgi_worker.testing import run_pending

async def main():
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(WorkerMiddleware, config=Config(redis_url="memory://"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/")).status_code == 202
        await run_pending(app)
        assert (await http.get("/")).status_code == 200
    for field in ("metrics", "tracing"):
        try:
            Config(**{field: True})
        except ConfigurationError as error:
            print(error)
    assert not [m for m in sys.modules if m.startswith(("prometheus_client", "opentelemetry"))]

asyncio.run(main())
"""
)


def test_the_package_runs_without_either_extra() -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'asgi-worker[metrics]'" in result.stdout
    assert "pip install 'asgi-worker[otel]'" in result.stdout

    cli = BLOCK_EXTRAS + "from asgi_worker.cli.commands import main; main()"
    arguments = ["worker", "tests.cli_apps:app", "--metrics-port", "9"]
    result = subprocess.run(
        [sys.executable, "-c", cli, *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "--metrics-port needs prometheus-client: pip install 'asgi-worker[metrics]'" in (
        result.stderr
    )


def test_a_metrics_port_in_use_is_a_clear_error_before_the_worker_starts(prefix: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "AW_CLI_PREFIX": prefix}
        command = asgi_worker_command(
            "worker",
            "tests.cli_apps:app",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        )
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, cwd=PROJECT, timeout=60
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


# -- real processes -----------------------------------------------------------------------


@pytest.mark.e2e
async def test_two_uvicorn_processes_are_summed_in_multiprocess_mode(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    sent = 60
    with running_stack(
        prefix, tmp_path, uvicorn_args=("--workers", "2"), worker=False, metrics="true"
    ) as stack:
        # A new connection per request: the kernel spreads them over both processes.
        for n in range(sent):
            async with httpx.AsyncClient(base_url=stack.base_url) as http:
                assert (await http.get(f"/slow?n={n}")).status_code == 202
        pids = {path.name.split("_")[-1] for path in directory.glob("counter_*.db")}
        assert len(pids) == 2, f"one process served every request: {pids}"
        for _ in range(4):  # each scrape is answered by either process: the same sum
            async with httpx.AsyncClient(base_url=stack.base_url) as http:
                text = (await http.get("/metrics")).text
            found = samples(text)
            assert requests(found, "miss-enqueued", "/slow") == sent, text
            assert value(found, "asgi_worker_lookup_seconds_count") == sent


@pytest.mark.e2e
def test_a_worker_serves_its_metrics_and_its_queue_on_its_port(prefix: str, tmp_path: Path) -> None:
    port = free_port()
    with running_stack(prefix, tmp_path, worker=False) as stack:
        with httpx.Client(base_url=stack.base_url) as http:
            for n in range(3):
                assert http.get(f"/slow?n={n}").status_code == 202
        command = asgi_worker_command(
            "worker",
            "tests.e2e_app:app",
            "--metrics-port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
        )
        stack.group.start("metrics-worker", command)
        url = f"http://127.0.0.1:{port}/metrics"
        deadline = time.monotonic() + 20
        while True:
            try:
                found = samples(httpx.get(url, timeout=2).text)
            except httpx.TransportError:
                found = {}
            stored = value(found, "asgi_worker_jobs_total", outcome="stored", route="/slow")
            if stored == 3:
                break
            assert time.monotonic() < deadline, f"{found}\n{stack.logs()}"
            time.sleep(0.1)
        assert value(found, "asgi_worker_queue_up", queue=f"{prefix}:queue") == 1
        assert value(found, "asgi_worker_queue_depth", queue=f"{prefix}:queue") == 0
        assert value(found, "asgi_worker_replay_seconds_count", route="/slow") == 3
        assert value(found, "asgi_worker_replay_seconds_sum", route="/slow") >= 3 * 0.3
        assert value(found, "asgi_worker_commits_total", result="stored") == 3
