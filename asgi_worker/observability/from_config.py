"""`observer_for`: the `Observer` a `Config` asks for, importing only the extras it needs."""

from __future__ import annotations

from asgi_worker.core.config import Config
from asgi_worker.observability.observer import Observer, Observers


def observer_for(config: Config, *, metrics: bool | None = None) -> Observer | None:
    """The observer `config` asks for (`metrics`, `tracing`), or None for neither.

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
    if not found:
        return None
    return found[0] if len(found) == 1 else Observers(*found)
