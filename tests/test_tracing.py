"""OpenTelemetry traces across the queue, with the SDK's in-memory exporter.

The request that enqueues carries its span's `traceparent` in the job; the worker's job
span is its child (and linked to it); the app's own spans in the replay nest below; the
polling client sends one `traceparent` on every poll, so the hit joins the same trace.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, ReplayWorker, WorkerMiddleware, worker_settings
from asgi_worker.client import fetch
from asgi_worker.observability.tracing import TracingObserver
from asgi_worker.testing import run_pending


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def create_app(config: Config, provider: TracerProvider) -> Starlette:
    tracer = provider.get_tracer("the-app")

    async def report(request: Request) -> Response:
        with tracer.start_as_current_span("the app's own work"):
            return PlainTextResponse(f"report {request.path_params['year']}")

    app = Starlette(routes=[Route("/reports/{year}", report)])
    observer = TracingObserver(tracer_provider=provider)
    app.add_middleware(WorkerMiddleware, config=config, observer=observer)
    return app


def named(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name.startswith(prefix)]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_shows_the_202_the_job_and_the_hit(
    config: Config, redis: Redis, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = create_app(config, provider)
    observer = TracingObserver(tracer_provider=provider)
    worker = ReplayWorker(**worker_settings(app, config, observer=observer), handle_signals=False)
    running = asyncio.create_task(worker.async_run())
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            with provider.get_tracer("the-client").start_as_current_span("client") as client:
                response = await fetch(
                    "/reports/2026", client=http, wait=None, max_retry_after=0.05, timeout=10
                )
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await worker.close()
    assert response.status_code == 200
    assert response.text == "report 2026"

    spans = exporter.get_finished_spans()
    trace_id = client.get_span_context().trace_id
    assert {span.context.trace_id for span in spans} == {trace_id}, "one trace"
    requests = named(spans, "asgi-worker GET /reports/{year}")
    outcomes = [span.attributes["asgi_worker.outcome"] for span in requests]  # type: ignore[index]
    assert outcomes[0] == "miss-enqueued"
    assert outcomes[-1] == "hit"
    assert set(outcomes[1:-1]) <= {"miss-queued"}
    client_id = client.get_span_context().span_id
    assert all(parent_id(span) == client_id for span in requests)  # each poll, same parent

    [job] = named(spans, "asgi-worker job GET /reports/{year}")
    enqueuer = requests[0]
    assert job.kind is SpanKind.CONSUMER
    assert parent_id(job) == enqueuer.context.span_id
    assert [link.context.span_id for link in job.links] == [enqueuer.context.span_id]
    assert job.attributes["asgi_worker.outcome"] == "stored"  # type: ignore[index]
    [replay] = named(spans, "asgi-worker replay")
    assert parent_id(replay) == job.context.span_id
    [work] = named(spans, "the app's own work")
    assert parent_id(work) == replay.context.span_id
    # The job ran after the 202 and before the hit.
    assert enqueuer.end_time <= job.start_time  # type: ignore[operator]
    assert job.end_time <= requests[-1].start_time  # type: ignore[operator]


async def test_a_traceparent_header_is_the_parent_without_a_server_span(
    config: Config, redis: Redis, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = create_app(dataclasses.replace(config, redis_url="memory://"), provider)
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traceparent = f"00-{trace_id}-{span_id}-01"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        first = await http.get("/reports/1", headers={"traceparent": traceparent})
        assert first.status_code == 202
        assert await run_pending(app) == 1  # memory://: the job runs in this process
        # A request with no trace context starts a trace of its own.
        assert (await http.get("/reports/1")).status_code == 200
    spans = exporter.get_finished_spans()
    first_span, hit = named(spans, "asgi-worker GET")
    assert first_span.kind is SpanKind.SERVER
    assert first_span.context.trace_id == int(trace_id, 16)
    assert parent_id(first_span) == int(span_id, 16)
    [job] = named(spans, "asgi-worker job")
    assert job.context.trace_id == int(trace_id, 16)
    assert parent_id(job) == first_span.context.span_id
    assert hit.context.trace_id != int(trace_id, 16)
    assert hit.parent is None


async def test_a_failing_replay_is_an_error_span_and_tracing_off_carries_nothing(
    config: Config, redis: Redis, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app = Starlette(routes=[Route("/boom", boom)])
    observer = TracingObserver(tracer_provider=provider)
    app.add_middleware(WorkerMiddleware, config=config, observer=observer)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/boom")).status_code == 202
        [raw] = await redis.zrange(config.queue, 0, 0)
        assert b"00-" in await redis.get(b"arq:job:" + raw)  # the job carries a traceparent
        worker = ReplayWorker(
            **worker_settings(app, config, observer=observer), burst=True, handle_signals=False
        )
        try:
            await worker.main()
        finally:
            await worker.close()
    [job] = named(exporter.get_finished_spans(), "asgi-worker job")
    assert job.attributes["asgi_worker.outcome"] == "error"  # type: ignore[index]
    assert job.status.status_code.name == "ERROR"

    untraced = Starlette(routes=[Route("/boom", boom)])
    untraced.add_middleware(WorkerMiddleware, config=config)
    transport = httpx.ASGITransport(app=untraced)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        assert (await http.get("/boom?again")).status_code == 202
    [raw] = await redis.zrange(config.queue, 0, 0)
    job_bytes = await redis.get(b"arq:job:" + raw)
    assert job_bytes is not None
    assert b"00-" not in job_bytes  # no trace argument at all without tracing
