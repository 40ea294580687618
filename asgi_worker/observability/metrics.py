"""Prometheus metrics: an `Observer` over prometheus-client (`pip install 'asgi-worker[metrics]'`).

Every metric lives in the `CollectorRegistry` a `PrometheusObserver` creates (never in
prometheus-client's global default registry), so two apps in one process, or a test that
builds many, do not collide. With `PROMETHEUS_MULTIPROC_DIR` set (prometheus-client's
multiprocess mode, for `uvicorn --workers N` or gunicorn), each process writes its values
to files in that directory and a scrape of any one process sums them all: the
exposition then reads the directory (`MultiProcessCollector`), not the process's own
registry. The waiting-requests gauge is summed over the live processes (`livesum`).

Names, labels and what they count: docs/metrics.md. Route labels: `route_labels.RouteLabels`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Scope

from asgi_worker.core.config import ConfigurationError
from asgi_worker.observability.observer import AtExit, JobRecord, NoObserver, RequestRecord
from asgi_worker.observability.route_labels import DEFAULT_MAX_LABELS, RouteFunction, RouteLabels
from asgi_worker.observability.stats import QueueDepth, read_queue

logger = logging.getLogger("asgi_worker")

# Lookups are one Redis round trip: sub-millisecond to a few ms, 2 s at most (redis_timeout).
_LOOKUP_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5)
# Jobs run the app's slow endpoints: milliseconds to job_timeout (60 s by default).
_JOB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class PrometheusObserver(NoObserver):
    """Counts requests and jobs into a registry of its own (see the module doc).

    `route` is asked for a path's route pattern where the app's Starlette routes do not
    tell (see `route_labels.RouteLabels`); at most `max_routes` distinct route labels are used,
    further routes count as `"other"`.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        route: RouteFunction | None = None,
        max_routes: int = DEFAULT_MAX_LABELS,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        """Where the metrics live; what `exposition()` serves outside multiprocess mode."""
        self.routes = RouteLabels(route, max_labels=max_routes)
        registry = self.registry
        self._requests = Counter(
            "asgi_worker_requests",
            "Requests the middleware saw, by outcome and route pattern.",
            ["outcome", "route"],
            registry=registry,
        )
        self._lookup = Histogram(
            "asgi_worker_lookup_seconds",
            "Redis lookup round trips (near-cache hits and shared lookups are not counted).",
            buckets=_LOOKUP_BUCKETS,
            registry=registry,
        )
        self._waiting = Gauge(
            "asgi_worker_waiting_requests",
            "Requests held for Prefer: wait now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._near = Counter(
            "asgi_worker_near_cache_hits",
            "Hits served from the in-process near cache (also counted as outcome=hit).",
            registry=registry,
        )
        self._jobs = Counter(
            "asgi_worker_jobs",
            "Replay jobs that ended, by outcome and route pattern.",
            ["outcome", "route"],
            registry=registry,
        )
        self._job_seconds = Histogram(
            "asgi_worker_job_seconds",
            "Whole replay jobs (replay and commit), by route pattern.",
            ["route"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self._replay_seconds = Histogram(
            "asgi_worker_replay_seconds",
            "The app's part of each replay job, by route pattern.",
            ["route"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self._commits = Counter(
            "asgi_worker_commits",
            "Commits of job results, by result (stored, kept-stale, refused, failed).",
            ["result"],
            registry=registry,
        )
        # labels() takes a lock and builds a key each call; a hit looks its child up here.
        self._request_children: dict[tuple[str, str], Any] = {}
        # Reports nothing until `watch_queue` gives it a queue (the worker's startup).
        self._queue = _QueueCollector()
        registry.register(self._queue)

    def bind(self, app: ASGIApp) -> None:
        """See `Observer.bind`: the route patterns come from `app`."""
        self.routes.bind(app)

    def request(self, record: RequestRecord) -> AbstractContextManager[None]:
        """See `Observer.request`: counts the request as it ends."""
        return AtExit(self._count_record, record)

    def _count_record(self, record: RequestRecord) -> None:
        self.count_request(record.scope, record.outcome, record.near)

    def count_request(self, scope: Scope, outcome: str, near: bool = False) -> None:
        """Count one request with `outcome` (one of `observer.REQUEST_OUTCOMES`)."""
        key = (outcome, self.routes(scope.get("path") or "/"))
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(*key)
        child.inc()
        if near:
            self._near.inc()

    def lookup(self, seconds: float) -> None:
        """See `Observer.lookup`."""
        self._lookup.observe(seconds)

    def bypassed(self, scope: Scope) -> None:
        """See `Observer.bypassed`."""
        self.count_request(scope, "bypass")

    def waiting(self, change: int) -> None:
        """See `Observer.waiting`."""
        self._waiting.inc(change)

    def job_ended(self, record: JobRecord) -> None:
        """See `Observer.job_ended`."""
        route = self.routes(record.path)
        self._jobs.labels(record.outcome, route).inc()
        self._job_seconds.labels(route).observe(record.seconds)
        if record.replay_seconds is not None:
            self._replay_seconds.labels(route).observe(record.replay_seconds)

    def committed(self, result: str) -> None:
        """See `Observer.committed`."""
        self._commits.labels(result).inc()

    def watch_queue(self, redis: Any, queue_name: str, timeout: float) -> None:
        """See `Observer.watch_queue`: queue depth and oldest job age, read at scrape time.

        Called in the worker's event loop; a scrape (in the metrics server's thread) asks
        that loop to read the queue, and waits at most `timeout` seconds.
        """
        self._queue.watch(asyncio.get_running_loop(), redis, queue_name, timeout)

    def exposition(self) -> ASGIApp:
        """An ASGI app answering any request with the metrics, in the text format.

        In multiprocess mode, the sum over every process writing to the directory.
        """
        return make_asgi_app(exposition_registry(self.registry, self._queue))

    def serve(self, port: int, host: str = "0.0.0.0") -> Callable[[], None]:
        """Serve `/metrics` on `port` from a thread (the worker); returns how to stop it.

        A port that cannot be bound raises `ConfigurationError`, saying which and why.
        """
        try:
            server, thread = start_http_server(
                port, addr=host, registry=exposition_registry(self.registry, self._queue)
            )
        except OSError as error:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {error.strerror or error}",
                field="metrics_port",
            ) from None

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


def exposition_registry(own: CollectorRegistry, queue: Collector) -> CollectorRegistry:
    """What a scrape reads: `own`, or in multiprocess mode every process's files.

    prometheus-client itself decides the mode from `PROMETHEUS_MULTIPROC_DIR` (when it is
    imported); its `MultiProcessCollector` refuses to be built outside that mode. Queue
    gauges (read at scrape time, in one process only) are added to the multiprocess view.
    """
    try:
        combined = CollectorRegistry()
        MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    except ValueError:  # not in multiprocess mode
        return own
    combined.register(queue)
    return combined


class _QueueCollector(Collector):
    """`asgi_worker_queue_depth` and `asgi_worker_queue_oldest_seconds`, read per scrape.

    arq's queue is a sorted set scored by the time each job is due, in ms: its size is
    the depth (running jobs included: arq removes a job as it ends), its lowest score the
    oldest. A scrape that cannot read the queue in time reports neither gauge (and
    `asgi_worker_queue_up` 0) rather than stale numbers.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._source: tuple[asyncio.AbstractEventLoop, Any, str, float] | None = None

    def watch(
        self, loop: asyncio.AbstractEventLoop, redis: Any, queue_name: str, timeout: float
    ) -> None:
        with self._lock:
            self._source = (loop, redis, queue_name, timeout)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            source = self._source
        if source is None:
            return []
        up = GaugeMetricFamily(
            "asgi_worker_queue_up",
            "1 if this scrape could read the queue, else 0.",
            labels=["queue"],
        )
        loop, redis, queue_name, timeout = source
        try:
            future: Future[QueueDepth] = asyncio.run_coroutine_threadsafe(
                read_queue(redis, queue_name), loop
            )
            found = future.result(timeout)
            depth, oldest = found.queued, found.oldest_queued
        except Exception as error:  # a scrape must answer; the gauge says what happened
            logger.warning("asgi-worker: metrics could not read queue %r: %r", queue_name, error)
            up.add_metric([queue_name], 0)
            return [up]
        up.add_metric([queue_name], 1)
        depth_family = GaugeMetricFamily(
            "asgi_worker_queue_depth",
            "Jobs in the arq queue, running ones included.",
            labels=["queue"],
        )
        depth_family.add_metric([queue_name], depth)
        age = GaugeMetricFamily(
            "asgi_worker_queue_oldest_seconds",
            "Seconds since the earliest-due job in the queue was due (0 when empty).",
            labels=["queue"],
        )
        age.add_metric([queue_name], 0.0 if oldest is None else oldest)
        return [up, depth_family, age]
