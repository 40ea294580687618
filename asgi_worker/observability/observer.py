"""The one interface through which requests and jobs are measured and traced.

`WorkerMiddleware`, `run_job` and the worker call an `Observer`; none of them imports
prometheus-client or OpenTelemetry. `observability.metrics` (the `[metrics]` extra) and
`observability.tracing` (the `[otel]` extra) implement it. With neither on, the middleware
holds no observer at all and takes the very code path it takes without this module: a
hit pays nothing (see docs/metrics.md for the measurement).

An observer sees:

- web side: each request handled by the cache, as a `RequestRecord` whose `outcome` is
  one of `REQUEST_OUTCOMES`; each Redis lookup's latency; the trace context a job
  enqueued carries; requests held for `Prefer: wait`; bypasses.
- worker side: each job, as a `JobRecord` (outcome one of `JOB_OUTCOMES`, durations); the
  replay inside it; each commit's result; and, for scrapes, the queue it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from starlette.types import ASGIApp, Scope

from asgi_worker.core.keys import RequestSnapshot

REQUEST_OUTCOMES = (
    "hit",
    "stale",
    "miss-enqueued",
    "miss-queued",
    "waited",
    "pass",
    "bypass",
    "unavailable",
    "queue-full",
    "bad-request",
    "gone",
)
"""What became of a request the middleware saw (the `outcome` label):

hit (fresh, from Redis or the near cache), stale (served stale while a refresh runs),
miss-enqueued (202, and this request enqueued the job), miss-queued (202, a job was
already queued or running), waited (held for `Prefer: wait` and served), pass (the key
is hit-for-pass: the app answered), bypass (not for the cache: other methods,
credentials, excluded paths), unavailable (Redis error: 503, or the app with
`fail_open`), queue-full (503, `max_queued`), bad-request (400, bad Host), gone (the
client left while held)."""

JOB_OUTCOMES = (
    "stored",
    "pass",
    "live-stream",
    "error",
    "timeout",
    "too-large",
    "invalid",
    "refused",
    "superseded",
    "commit-failed",
    "corrupt-job",
    "cancelled",
    "failed",
)
"""What became of a job (the `outcome` label): stored (the app's response), pass (the
app answered private: a hit-for-pass marker), live-stream (an event stream, or a body
still streaming at `job_timeout` or past `max_body_bytes`: a hit-for-pass marker), error
(the app raised; a 500 is stored), timeout (504 stored), too-large (502 stored), invalid
(the app broke the ASGI message order; 502 stored), refused (an invalidation or a newer
claim came first: nothing stored), superseded (its claim had run out and a newer job
held it), commit-failed (the commit did not reach Redis), corrupt-job (unreadable
snapshot), cancelled (the worker stopped it), failed (an error in the worker itself)."""


@dataclass(slots=True)
class RequestRecord:
    """One request handled by the middleware, as it is being answered."""

    scope: Scope
    outcome: str = "gone"
    """One of `REQUEST_OUTCOMES`, set when the answer is chosen."""
    enqueued: bool = False
    """This request's lookup enqueued a job (set by the middleware)."""
    near: bool = False
    """A hit served from the near cache."""


@dataclass(slots=True)
class JobRecord:
    """One replay job in the worker (or in the web process, for in-process jobs)."""

    snapshot: RequestSnapshot | None
    """None for a job whose snapshot could not be read (outcome `corrupt-job`)."""
    trace: str | None
    """The W3C `traceparent` of the request that enqueued the job, if it carried one."""
    began: float = field(default_factory=time.monotonic)
    outcome: str = "cancelled"
    """One of `JOB_OUTCOMES`, final once `ended` is called."""
    seconds: float = 0.0
    """The whole job: replay and commit."""
    replay_seconds: float | None = None
    """The app's part (None: the job ended before it replayed)."""
    deferred: bool = False
    """The commit was handed to the worker's end-of-job transaction: the job is reported
    when that commit's result is known, not when `run_job` returns."""

    @property
    def path(self) -> str:
        """The request's path ("" for an unreadable snapshot)."""
        return "" if self.snapshot is None else self.snapshot.path

    def finish(self, word: str | None = None) -> None:
        """Fix `seconds` and, from the job log's `word`, the outcome.

        The log says "stored" or "kept-stale" for what `outcome` already tells apart
        (pass, error, ...); "failed (KeyError)" is "failed"; other words are outcomes.
        """
        self.seconds = time.monotonic() - self.began
        if word is None or word in ("stored", "kept-stale"):
            return
        self.outcome = "failed" if word.startswith("failed") else word


class AtExit:
    """A context manager that calls `then(record)` at exit: no generator (the hit path)."""

    __slots__ = ("_record", "_then")

    def __init__(self, then: Callable[[RequestRecord], None], record: RequestRecord) -> None:
        self._then = then
        self._record = record

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._then(self._record)


class Observer(Protocol):
    """What the middleware and the worker report to.

    Every method must be cheap and must not raise: it runs inside requests and jobs.
    """

    def bind(self, app: ASGIApp) -> None:
        """The app the routes are found in (the served app; called once, early)."""

    def request(self, record: RequestRecord) -> AbstractContextManager[None]:
        """Around one request's handling; `record.outcome` is final at exit."""
        ...

    def lookup(self, seconds: float) -> None:
        """One Redis lookup round trip took `seconds`."""

    def carry(self) -> str | None:
        """The `traceparent` a job enqueued by the current request carries, if any."""

    def bypassed(self, scope: Scope) -> None:
        """A request went straight to the app (not for the cache)."""

    def waiting(self, change: int) -> None:
        """Requests held for `Prefer: wait` in this process changed by `change`."""

    def job(self, record: JobRecord) -> AbstractContextManager[None]:
        """Around one job (a span, for tracing)."""
        ...

    def replay(self, record: JobRecord) -> AbstractContextManager[None]:
        """Around the app's replay inside a job."""
        ...

    def job_ended(self, record: JobRecord) -> None:
        """The job is over: `record.outcome`, `seconds` and `replay_seconds` are final."""

    def committed(self, result: str) -> None:
        """A commit reached Redis with `result` (`store.Committed` values) or failed."""

    def watch_queue(self, redis: Any, queue_name: str, timeout: float) -> None:
        """The worker's queue client (an async Redis), for depth and age at scrape time."""

    def exposition(self) -> ASGIApp | None:
        """An ASGI app serving the metrics (the middleware answers `metrics_path` with it)."""

    async def close(self) -> None:
        """At shutdown (the middleware's, the worker's): finish and release what it holds."""


class NoObserver:
    """The `Observer` that does nothing; a base for observers that need only a part."""

    def bind(self, app: ASGIApp) -> None:
        """See `Observer.bind`."""

    def request(self, record: RequestRecord) -> AbstractContextManager[None]:
        """See `Observer.request`."""
        return nullcontext()

    def lookup(self, seconds: float) -> None:
        """See `Observer.lookup`."""

    def carry(self) -> str | None:
        """See `Observer.carry`."""
        return None

    def bypassed(self, scope: Scope) -> None:
        """See `Observer.bypassed`."""

    def waiting(self, change: int) -> None:
        """See `Observer.waiting`."""

    def job(self, record: JobRecord) -> AbstractContextManager[None]:
        """See `Observer.job`."""
        return nullcontext()

    def replay(self, record: JobRecord) -> AbstractContextManager[None]:
        """See `Observer.replay`."""
        return nullcontext()

    def job_ended(self, record: JobRecord) -> None:
        """See `Observer.job_ended`."""

    def committed(self, result: str) -> None:
        """See `Observer.committed`."""

    def watch_queue(self, redis: Any, queue_name: str, timeout: float) -> None:
        """See `Observer.watch_queue`."""

    def exposition(self) -> ASGIApp | None:
        """See `Observer.exposition`."""
        return None

    async def close(self) -> None:
        """See `Observer.close`."""


class Observers(NoObserver):
    """Several observers as one (metrics and tracing together), in the order given."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    @contextmanager
    def _each(self, enter: Callable[[Observer], AbstractContextManager[None]]) -> Iterator[None]:
        """Enter `enter(observer)` for each observer, leave them in reverse order."""
        with ExitStack() as stack:
            for observer in self.observers:
                stack.enter_context(enter(observer))
            yield

    def bind(self, app: ASGIApp) -> None:
        """See `Observer.bind`."""
        for observer in self.observers:
            observer.bind(app)

    def request(self, record: RequestRecord) -> AbstractContextManager[None]:
        """See `Observer.request`."""
        return self._each(lambda observer: observer.request(record))

    def lookup(self, seconds: float) -> None:
        """See `Observer.lookup`."""
        for observer in self.observers:
            observer.lookup(seconds)

    def carry(self) -> str | None:
        """See `Observer.carry`: the first trace context any observer gives."""
        traces = [observer.carry() for observer in self.observers]
        return next((trace for trace in traces if trace is not None), None)

    def bypassed(self, scope: Scope) -> None:
        """See `Observer.bypassed`."""
        for observer in self.observers:
            observer.bypassed(scope)

    def waiting(self, change: int) -> None:
        """See `Observer.waiting`."""
        for observer in self.observers:
            observer.waiting(change)

    def job(self, record: JobRecord) -> AbstractContextManager[None]:
        """See `Observer.job`."""
        return self._each(lambda observer: observer.job(record))

    def replay(self, record: JobRecord) -> AbstractContextManager[None]:
        """See `Observer.replay`."""
        return self._each(lambda observer: observer.replay(record))

    def job_ended(self, record: JobRecord) -> None:
        """See `Observer.job_ended`."""
        for observer in self.observers:
            observer.job_ended(record)

    def committed(self, result: str) -> None:
        """See `Observer.committed`."""
        for observer in self.observers:
            observer.committed(result)

    def watch_queue(self, redis: Any, queue_name: str, timeout: float) -> None:
        """See `Observer.watch_queue`."""
        for observer in self.observers:
            observer.watch_queue(redis, queue_name, timeout)

    def exposition(self) -> ASGIApp | None:
        """See `Observer.exposition`: the first observer's that has one."""
        apps = [observer.exposition() for observer in self.observers]
        return next((app for app in apps if app is not None), None)

    async def close(self) -> None:
        """See `Observer.close`."""
        for observer in self.observers:
            await observer.close()
