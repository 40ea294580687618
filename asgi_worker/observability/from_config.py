"""`observer_for`: the `Observer` a `Config` asks for, importing only the extras it needs."""

from __future__ import annotations

from functools import partial

from asgi_worker.backends.redis.clients import redis_client
from asgi_worker.core.config import Config
from asgi_worker.core.keys import RedisKeys
from asgi_worker.observability.dashboard_counts import DashboardObserver
from asgi_worker.observability.observer import Observer, Observers


def observer_for(config: Config, *, metrics: bool | None = None) -> Observer | None:
    """The observer `config` asks for (`metrics`, `tracing`, `dashboard_counts`), or None.

    `metrics` overrides `config.metrics` (the worker turns metrics on with
    `--metrics-port`). The extras are imported only here, and only when asked for;
    `Config` has already checked that they are installed.
    """
    found: list[Observer] = []
    if config.metrics if metrics is None else metrics:
        from asgi_worker.observability.metrics import PrometheusObserver

        found.append(PrometheusObserver())
    if config.tracing:
        from asgi_worker.observability.tracing import TracingObserver

        found.append(TracingObserver())
    if config.dashboard_counts:
        found.append(dashboard_counts_for(config))
    if not found:
        return None
    return found[0] if len(found) == 1 else Observers(*found)


def dashboard_counts_for(config: Config) -> DashboardObserver:
    """The dashboard's counts: written to the queue's Redis, or in process (`memory://`)."""
    keys = RedisKeys(config.prefix)
    if config.embedded:
        return DashboardObserver(keys, None)
    url = config.queue_redis_url or config.redis_url
    return DashboardObserver(keys, partial(redis_client, url, config))
