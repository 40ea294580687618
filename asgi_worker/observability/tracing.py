"""OpenTelemetry traces across the queue: an `Observer` over the OpenTelemetry API.

`pip install 'asgi-worker[otel]'` and `Config(tracing=True)`. Only the API is used: spans
go wherever the application's `TracerProvider` sends them (none set: nowhere, at the
API's no-op cost).

- Each request the middleware handles is a span, `asgi-worker GET <route>`: a child of
  the current span if a server instrumentation made one, else of the request's W3C
  `traceparent` header, else a new trace. Its `asgi_worker.outcome` attribute says hit,
  miss-enqueued, ... (`observer.REQUEST_OUTCOMES`).
- The request that enqueues a job puts its span's `traceparent` in the job (an argument
  of the arq job, next to the snapshot). The worker's job span, `asgi-worker job GET
  <route>` (kind CONSUMER), is that span's child, and links to it too: the 202, the job
  and everything the app does in the replay (`asgi-worker replay GET <route>`, and the
  app's own spans below it) are one trace.
- A client that sends the same `traceparent` on every poll (`asgi_worker.client.fetch`
  does, see docs/tracing.md) makes the hit that ends the polling part of that trace too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp

from asgi_worker.observability.observer import JobRecord, NoObserver, RequestRecord
from asgi_worker.observability.route_labels import DEFAULT_MAX_LABELS, RouteFunction, RouteLabels

_PROPAGATOR = TraceContextTextMapPropagator()
# Job outcomes that mean the app (or the worker) failed: the job span's status is ERROR.
_FAILED = frozenset({"error", "timeout", "too-large", "invalid", "failed", "commit-failed"})


class TracingObserver(NoObserver):
    """Spans for requests and jobs, one trace across the queue (see the module doc).

    `tracer_provider` defaults to the global one (`trace.set_tracer_provider`). `route`
    and `max_routes` name spans by route pattern as the metrics label them.
    """

    def __init__(
        self,
        *,
        tracer_provider: TracerProvider | None = None,
        route: RouteFunction | None = None,
        max_routes: int = DEFAULT_MAX_LABELS,
    ) -> None:
        self._tracer = trace.get_tracer("asgi_worker", tracer_provider=tracer_provider)
        self.routes = RouteLabels(route, max_labels=max_routes)

    def bind(self, app: ASGIApp) -> None:
        """See `Observer.bind`: span names use the routes of `app`."""
        self.routes.bind(app)

    @contextmanager
    def request(self, record: RequestRecord) -> Iterator[None]:
        """See `Observer.request`: the request's span, current while it is handled."""
        scope = record.scope
        parent: Context | None = None
        kind = SpanKind.INTERNAL  # below a server instrumentation's span
        if not trace.get_current_span().get_span_context().is_valid:
            parent = _PROPAGATOR.extract(_trace_headers(scope.get("headers") or ()))
            kind = SpanKind.SERVER
        route = self.routes(scope.get("path") or "/")
        method = scope.get("method", "GET")
        attributes = {"http.request.method": method, "http.route": route}
        name = f"asgi-worker {method} {route}"
        with self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes
        ) as span:
            yield
            span.set_attribute("asgi_worker.outcome", record.outcome)
            span.set_attribute("asgi_worker.enqueued", record.enqueued)

    def carry(self) -> str | None:
        """See `Observer.carry`: the current span's `traceparent`."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    @contextmanager
    def job(self, record: JobRecord) -> Iterator[None]:
        """See `Observer.job`: the job's span, a child of (and linked to) the enqueuer's."""
        parent = _PROPAGATOR.extract({"traceparent": record.trace}) if record.trace else None
        links = []
        if parent is not None:
            context = trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                links.append(Link(context, {"asgi_worker.link": "enqueued-by"}))
        route = self.routes(record.path)
        with self._tracer.start_as_current_span(
            f"asgi-worker job GET {route}",
            context=parent,
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={"http.route": route},
        ) as span:
            yield
            span.set_attribute("asgi_worker.outcome", record.outcome)
            if record.outcome in _FAILED:
                span.set_status(StatusCode.ERROR, record.outcome)

    @contextmanager
    def replay(self, record: JobRecord) -> Iterator[None]:
        """See `Observer.replay`: the app's part of the job; its own spans nest below."""
        route = self.routes(record.path)
        with self._tracer.start_as_current_span(f"asgi-worker replay GET {route}"):
            yield


def _trace_headers(headers: object) -> dict[str, str]:
    """`traceparent` and `tracestate` of ASGI headers, for the propagator."""
    found: dict[str, str] = {}
    for name, value in headers:  # type: ignore[attr-defined]
        lowered = bytes(name).lower()
        if lowered in (b"traceparent", b"tracestate"):
            found[lowered.decode()] = bytes(value).decode("latin-1")
    return found
