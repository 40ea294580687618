"""Run one replay job: replay the snapshot, turn the outcome into an entry, commit.

Independent of the queue: the arq worker and the in-process queue both call `run_job`.
Every path ends in a commit (the app's response, a hit-for-pass marker, or a short-lived
error response), which also releases the claim, so no request is left waiting on a job
that has ended (docs/design.md, principle 4).

Each Redis step of a job (the steps before the app runs, the commit) is tried again after
a transient error (`retries`), for up to `Config.redis_timeout` in all. A job that gives
up releases its claim (best effort, as long again at most), so that the next request
enqueues a new job at once instead of waiting out the claim's lease; only an error that
would come again (a key of the wrong type) keeps the claim until its lease ends, as a
back-off marker (a claim with no job behind it that no request takes for a lost job's,
see lost.py), which then spaces the jobs that would meet it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext, suppress
from typing import Any

from starlette.types import ASGIApp

from asgi_worker.backends.base import Body, Committed, Store, Write
from asgi_worker.backends.redis.retries import REDIS_ERRORS, Throttle, brief, retried, transient
from asgi_worker.core.codec import (
    Apart,
    CorruptEntryError,
    StoredResponse,
    decode_snapshot,
    encode_response,
)
from asgi_worker.core.config import Config
from asgi_worker.core.freshness import entity_tag, lifetime, shareable
from asgi_worker.core.keys import (
    Headers,
    RequestSnapshot,
    printable,
    request_line,
    request_target,
)
from asgi_worker.core.replay import (
    BodyTooLargeError,
    LeftRunningError,
    LiveStreamError,
    ReplayedResponse,
    ReplayError,
    ReplayTimeoutError,
    finish,
    replay,
)
from asgi_worker.core.representations import for_storing
from asgi_worker.observability.observer import JobRecord, Observer
from asgi_worker.worker.progress import ProgressReporter, ProgressSink

logger = logging.getLogger("asgi_worker")

# Tags beyond this many are ignored: each costs a key write per commit.
_MAX_TAGS = 64

# Connection-level headers describe one hop, not the stored response; Content-Length is
# set from the body we actually hold, and Age is computed when the entry is served.
_NOT_STORED = frozenset(
    {
        b"age",
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """A replay job's result, ready for `Store.commit`, and what to log about it."""

    digest: str
    token: str
    started: float
    write: Write
    outcome: str
    """The replay's word for the job log: "stored", "timeout", "error", ..."""
    snapshot: RequestSnapshot
    record: JobRecord | None = None
    """With an observer: the job, reported once this commit's result is known."""
    observer: Observer | None = None
    after: Callable[[], Awaitable[None]] | None = None
    """Waits for what the app does after its answer (bounded by `job_timeout`): awaited
    once the commit is sent, so that work never holds the commit up."""
    throttle: Throttle = dataclasses.field(default_factory=Throttle)
    """Where a failed commit is logged: one per process, shared by its jobs."""

    async def send(self, store: Store) -> Committed:
        """`Store.commit` of this result (unbounded: the caller sets the timeout)."""
        return await store.commit(self.digest, self.token, self.started, self.write)

    async def send_retried(self, store: Store, within: float) -> Committed:
        """`send`, tried again after a transient error for up to `within` seconds.

        Safe to repeat: a commit that went through released the claim it checks, so a
        second one is refused, never stored twice.
        """
        return await retried(functools.partial(self.send, store), within=within)

    async def send_and_report(self, store: Store, within: float) -> str:
        """`send_retried`, then `report`, or `give_up`; the job's word for the log."""
        try:
            committed = await self.send_retried(store, within)
        except REDIS_ERRORS as error:
            await self.give_up(store, error, within)
            return "commit-failed"
        return self.report(committed)

    async def give_up(self, store: Store, error: BaseException, within: float) -> None:
        """Log a commit that failed with `error`; release the claim if the error may pass.

        Releasing takes up to `within` seconds. A released claim lets the next request
        enqueue a new job at once; one that holds makes it wait for the claim's lease.
        """
        released = await let_go(store, self.digest, self.token, error, within)
        self.report_lost(error, released=released)

    def report(self, committed: Committed) -> str:
        """Log a commit that stored nothing; return the job's word for the log."""
        refused = committed is Committed.REFUSED
        self._observe(committed.value, "refused" if refused else None)
        if committed is Committed.STORED:
            return self.outcome
        logger.info(
            "asgi-worker: %s: %s, %s", request_target(self.snapshot), self.outcome, committed.value
        )
        return str(committed.value)

    def report_lost(self, error: BaseException, *, released: bool = False) -> None:
        """Log a commit that failed: nothing stored; say whether its claim was released."""
        self._observe("failed", "commit-failed")
        self.throttle.log(
            logging.ERROR,
            "asgi-worker: %s: %s, but the commit failed (%s); %s",
            request_target(self.snapshot),
            self.outcome,
            brief(error),
            _RELEASED if released else _HELD,
        )

    def _observe(self, result: str, outcome: str | None) -> None:
        record, observer = self.record, self.observer
        if record is None or observer is None:
            return
        observer.committed(result)
        if outcome is not None:
            record.outcome = outcome
        if record.deferred:  # run_job has returned: the job ends here
            record.finish()
            observer.job_ended(record)


_RELEASED = "its claim is released: the next request enqueues it again"
_HELD = "its claim holds until its lease ends"

HandOff = Callable[[Commit], bool]
"""Takes a job's `Commit` to send later (see `arq_worker.ReplayWorker`), or returns False."""


async def let_go(
    store: Store, digest: str, token: str, error: BaseException, within: float
) -> bool:
    """The claim of a job that gave up after `error`; True if it is released.

    Released if the error may pass (`transient`): the next request enqueues a new job at
    once. Otherwise the next job would meet it again: the claim stays, with no job
    behind it, until its lease ends (`Store.back_off`), which spaces those jobs. Best
    effort, up to `within` s: a claim Redis would not change holds until its lease ends.
    """
    if transient(error):
        return await release(store, digest, token, within)
    with suppress(*REDIS_ERRORS):
        await retried(functools.partial(store.back_off, digest, token), within=within)
    return False


async def release(
    store: Store, digest: str, token: str, within: float, *, each: float | None = None
) -> bool:
    """Give up the claim `token` holds (best effort, up to `within` s); False if it failed.

    `each`: how long one try may take (see `retries.retried`).
    """
    try:
        await retried(functools.partial(store.release, digest, token), within=within, each=each)
    except REDIS_ERRORS:
        return False
    return True


async def run_job(
    app: ASGIApp,
    store: Store,
    config: Config,
    snapshot_bytes: bytes,
    token: str,
    claimed_at: float | None = None,
    *,
    state: Mapping[str, Any] | None = None,
    hand_off: HandOff | None = None,
    mounted: bool = False,
    observer: Observer | None = None,
    trace: str | None = None,
    throttle: Throttle | None = None,
    progress: ProgressSink | None = None,
) -> str:
    """Replay one request and store the result; returns a word for the job log.

    `claimed_at` is `Lookup.claimed_at` of the claim the job runs under. It is the job's
    start time for `Store.commit` unless the job waited so long in the queue that the lease
    might run out before it ends; then (and for jobs that do not carry it) `Store.begin`
    renews the lease and takes a new start time first: one more round trip.

    `hand_off`, if given, may take the finished job's `Commit` to send in a transaction of
    its own; the job then returns its outcome without committing.

    `app` is where the replay enters: the app the server is given, or with `mounted` a
    sub-app below the `Mount` that leads to the middleware (see `replay.build_scope`).

    Each job that has a readable snapshot logs one line as it ends (`log_job`).

    `observer` sees the job (`trace`: the enqueuing request's `traceparent`, if any).

    A Redis step that fails past its retries ends the job without raising (its word is
    "failed (<error>)", or "commit-failed"): it is logged through `throttle`, which a
    worker shares between its jobs so that a Redis refusing them all is a line every
    10 s, not one a job.

    `progress` keeps what the handler reports with `report_progress` (the job's
    `JobQueue.report`); without it, reports are dropped.
    """
    try:
        snapshot = decode_snapshot(snapshot_bytes, config.credential_guard())
    except CorruptEntryError as error:
        # Without a snapshot there is no key to release: the next request that finds its
        # claim, past the enqueue's grace, finds the job gone and queues it anew (lost.py).
        logger.error("asgi-worker: dropping a job with an unreadable snapshot: %s", error)
        if observer is not None:
            corrupt = JobRecord(None, trace, outcome="corrupt-job")
            corrupt.finish()
            observer.job_ended(corrupt)
        return "corrupt-job"
    began = time.monotonic()
    outcome = "cancelled"
    record = None if observer is None else JobRecord(snapshot, trace)
    # The span (with tracing) covers the job; `record` is final before the span ends.
    span = nullcontext() if observer is None or record is None else observer.job(record)
    try:
        with span:
            try:
                outcome = await _run(
                    app,
                    store,
                    config,
                    snapshot,
                    token,
                    claimed_at,
                    state,
                    hand_off,
                    mounted,
                    record,
                    observer,
                    throttle or Throttle(),
                    progress,
                )
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                outcome = f"failed ({type(error).__name__})"
                raise
            finally:
                if record is not None:
                    record.finish(outcome)
    finally:
        log_job(snapshot, outcome, time.monotonic() - began)
        if observer is not None and record is not None and not record.deferred:
            observer.job_ended(record)
    return outcome


def log_job(snapshot: RequestSnapshot, outcome: str, duration: float) -> None:
    """The job's one line: `GET /path?query: stored in 0.412 s [digest]`, at INFO.

    The same fields go in `extra=` (`method`, `path`, `query`, `outcome`, `duration`,
    `digest`) for JSON formatters. Nothing secret: no header is logged, and credentials
    (`Config.key_credentials`) never leave the sealed snapshot here.
    """
    digest = snapshot.digest
    logger.info(
        "asgi-worker: %s: %s in %.3f s [%s]",
        request_line(snapshot),
        outcome,
        duration,
        digest,
        extra={
            "method": "GET",
            "path": printable(snapshot.path),
            "query": printable(snapshot.query_string.decode("latin-1")),
            "outcome": outcome,
            "duration": round(duration, 6),
            "digest": digest,
        },
    )


async def _run(
    app: ASGIApp,
    store: Store,
    config: Config,
    snapshot: RequestSnapshot,
    token: str,
    claimed_at: float | None,
    state: Mapping[str, Any] | None,
    hand_off: HandOff | None,
    mounted: bool,
    record: JobRecord | None,
    observer: Observer | None,
    throttle: Throttle,
    progress: ProgressSink | None,
) -> str:
    digest = snapshot.digest
    # Store calls are bounded here, not by per-read socket timeouts (cheaper per call).
    try:
        times = await retried(
            functools.partial(_before_the_app, store, config, snapshot, token, claimed_at),
            within=config.redis_timeout,
        )
    except REDIS_ERRORS as error:
        return await _give_up(store, config, snapshot, token, error, throttle)
    if times is None:
        return "superseded"  # its lease ran out and a newer job holds the claim
    started, listed_at = times
    began = time.monotonic()
    replaying = functools.partial(_replay_or_error, app, snapshot, config, state, mounted)
    if progress is not None:
        replaying = functools.partial(_reporting, progress, config.redis_timeout, replaying)
    if observer is None or record is None:
        replayed, outcome = await replaying()
    else:
        with observer.replay(record):
            replayed, outcome = await replaying()
        record.replay_seconds = time.monotonic() - began
        passed = outcome == "stored" and _private(replayed, snapshot, config)
        record.outcome = "pass" if passed else outcome
    # The store's clock, not this host's: the web process computes `Age` against it.
    now = listed_at + time.monotonic() - began
    write = to_write(replayed, outcome=outcome, snapshot=snapshot, config=config, now=now)
    if outcome == "stored" and (config.adaptive_retry_after or config.fair_queueing):
        write = dataclasses.replace(write, duration=time.monotonic() - began)
    after = None
    if replayed.rest is not None:  # the app's run, which may go on after its answer
        ends_at = began + config.job_timeout
        after = functools.partial(_after_answer, replayed, ends_at, snapshot, config)
    commit = Commit(
        digest, token, started, write, outcome, snapshot, record, observer, after, throttle
    )
    if hand_off is not None and hand_off(commit):
        if record is not None:
            record.deferred = True
        return outcome  # the worker commits it as it marks the job done, then waits `after`
    try:
        return await commit.send_and_report(store, _commit_time(config, write))
    finally:
        if after is not None:
            await after()


async def _reporting(
    sink: ProgressSink,
    within: float,
    replaying: Callable[[], Awaitable[tuple[ReplayedResponse, str]]],
) -> tuple[ReplayedResponse, str]:
    """`replaying()` with a `ProgressReporter` for the handler's `report_progress`."""
    reporter = ProgressReporter(sink, within=within)
    entered = reporter.enter()
    try:
        return await replaying()
    finally:
        ProgressReporter.leave(entered)
        await reporter.close()


# A body stored apart is written with its commit: each this many bytes of it give the
# commit `redis_timeout` more (at 64 MiB a second or more, it never needs them all).
_BODY_BYTES_PER_TIMEOUT = 64 * 1024 * 1024


def _commit_time(config: Config, write: Write) -> float:
    """Seconds a commit of `write` may take, its retries included."""
    pieces = 0 if write.body is None else -(-write.body.length // _BODY_BYTES_PER_TIMEOUT)
    return config.redis_timeout * (1 + pieces)


async def _before_the_app(
    store: Store, config: Config, snapshot: RequestSnapshot, token: str, claimed_at: float | None
) -> tuple[float, float] | None:
    """The job's steps before its app runs; None if its claim was lost.

    Else its start time (for `Store.commit`), and the store's time as its app is about to
    run (`Store.list_path`). Safe to repeat: the claim renewed again is still the job's
    own, the path listed again is still listed.
    """
    started = claimed_at
    # Long enough for the app and the commit after it.
    needed = config.job_timeout + config.redis_timeout
    if started is None or store.lease_left(started) < needed:
        started = await store.begin(snapshot.digest, token, snapshot.path)
        if started is None:
            return None
    # Before the app runs: a prefix invalidation from now on finds the path.
    return started, await store.list_path(snapshot.path)


async def _give_up(
    store: Store,
    config: Config,
    snapshot: RequestSnapshot,
    token: str,
    error: BaseException,
    throttle: Throttle,
) -> str:
    """End a job whose steps before the app failed past their retries; its word for the log.

    Its claim is released if the error may pass, so that the next request enqueues the
    job again at once (`let_go`).
    """
    released = await let_go(store, snapshot.digest, token, error, config.redis_timeout)
    throttle.log(
        logging.ERROR,
        "asgi-worker: %s: not run: Redis failed before the app ran (%s); %s",
        request_target(snapshot),
        brief(error),
        _RELEASED if released else _HELD,
    )
    return f"failed ({type(error).__name__})"


def to_write(
    replayed: ReplayedResponse,
    *,
    outcome: str,
    snapshot: RequestSnapshot,
    config: Config,
    now: float | None = None,
) -> Write:
    """The entry, lifetime and index data to commit for one replay's outcome.

    `now` is the entry's `stored_at`: the store's time (see `Store.list_path`), by
    default this host's.

    `outcome` is `_replay_or_error`'s: "stored" (`replayed` is the app's answer),
    "live-stream" (a hit-for-pass marker), or an error: `replayed` stands for it, or is
    the answer of a layer outside the middleware for it (`replayed.handled`), stored as
    the app's.
    """
    if outcome == "live-stream":
        return _pass_marker(snapshot, config)
    if outcome != "stored" and replayed.handled is None:
        # our own error response: short-lived, and a stale copy is better
        entry = encode_response(stored(replayed, now))
        return Write(
            entry,
            fresh=config.error_ttl,
            keep=config.error_ttl,
            path=snapshot.path,
            query=snapshot.query_string,
            failed=True,
            retry_after=config.error_ttl,
        )
    life = lifetime(replayed.status, replayed.headers, snapshot.path, config)
    if _private(replayed, snapshot, config, life.shared):
        return _pass_marker(snapshot, config)
    # One pass: take the tags out of the headers, and see whether the app sent an ETag.
    tag_header = config.tag_header.encode()
    tags: dict[str, None] = {}
    headers: list[tuple[bytes, bytes]] = []
    has_etag = False
    for name, value in replayed.headers:
        if name == tag_header:
            tags.update(dict.fromkeys(value.decode("latin-1").split()))
        else:
            headers.append((name, value))
            has_etag = has_etag or name == b"etag"
    if not has_etag:
        headers.append((b"etag", entity_tag((), replayed.chunks)))
    if replayed.leaving:
        headers.extend(_outer_vary(replayed.headers, replayed.leaving, config))
    kept = ReplayedResponse(replayed.status, tuple(headers), replayed.chunks)
    body = None
    if replayed.length > config.stream_body_bytes and _has_body(replayed.status):
        # Stored apart, in the app's own chunks: no joined copy, no msgpack copy of it.
        body = Body(secrets.token_hex(8), replayed.chunks, replayed.length)
    response = stored(kept, now, apart=None if body is None else body.version)
    if config.compress and body is None:  # a body stored apart is stored as it came
        response = for_storing(
            response,
            min_bytes=config.compress_min_bytes,
            limit=config.max_body_bytes,
            level=config.compress_level,
        )
    return Write(
        encode_response(response),
        fresh=life.fresh,
        keep=life.fresh + life.stale,
        path=snapshot.path,
        query=snapshot.query_string,
        tags=tuple(tags)[:_MAX_TAGS],
        failed=replayed.status >= 500,
        retry_after=config.error_ttl,
        body=body,
    )


def _outer_vary(answered: Headers, leaving: Headers, config: Config) -> Headers:
    """A `Vary` for what layers outside the middleware added to the answer's, if anything.

    Such a layer varied the answer on the way out on a header the replay did not carry:
    a session middleware adds `Vary: Cookie` when the handler read the session. On a hit
    it runs again, but the handler does not, so it would not say so again; the stored
    answer keeps it, for the caches in front. Headers of the key (`Config.vary`) are left
    out: the replay carried them, so a layer that varies on them does so on the hit too.
    """
    seen = {
        token.lower() for name, value in answered if name == b"vary" for token in _tokens(value)
    }
    seen.update(name.encode() for name in config.vary)
    added: list[bytes] = []
    for name, value in leaving:
        for token in _tokens(value) if name == b"vary" else ():
            if token.lower() not in seen:  # header names are case-insensitive
                seen.add(token.lower())
                added.append(token)  # as the layer spelled it
    return ((b"vary", b", ".join(added)),) if added else ()


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip() for token in value.split(b",") if token.strip()]


def _pass_marker(snapshot: RequestSnapshot, config: Config) -> Write:
    """A hit-for-pass marker: the key's requests go to the app for `pass_ttl`."""
    marker = StoredResponse(0, (), b"", time.time(), hit_for_pass=True)
    return Write(
        encode_response(marker),
        fresh=config.pass_ttl,
        keep=config.pass_ttl,
        path=snapshot.path,
        query=snapshot.query_string,
    )


def _private(
    replayed: ReplayedResponse,
    snapshot: RequestSnapshot,
    config: Config,
    shared: bool | None = None,
) -> bool:
    """Private as the app answered, or as a layer outside the middleware sent it on.

    Such an answer is stored as a hit-for-pass marker. `shared`: what the answer's
    lifetime says, if known already.
    """
    if shared is None:
        shared = lifetime(replayed.status, replayed.headers, snapshot.path, config).shared
    return not shared or (replayed.leaving is not None and not shareable(replayed.leaving))


async def _replay_or_error(
    app: ASGIApp,
    snapshot: RequestSnapshot,
    config: Config,
    state: Mapping[str, Any] | None,
    mounted: bool,
) -> tuple[ReplayedResponse, str]:
    """The app's response, or the error response that stands for its failure.

    A live stream's outcome is "live-stream", with no response to store: the key
    becomes hit-for-pass (`to_write`).
    """
    try:
        response = await replay(
            app,
            snapshot,
            max_body_bytes=config.max_body_bytes,
            time_limit=config.job_timeout,
            state=state,
            prefix=config.prefix,
            mounted=mounted,
        )
    except LiveStreamError as error:
        logger.info(
            "asgi-worker: %s is a live stream (%s): not stored, the app serves it for pass_ttl=%ss",
            request_target(snapshot),
            error,
            config.pass_ttl,
        )
        return _NO_ANSWER, "live-stream"
    except ReplayTimeoutError:
        logger.error(
            "asgi-worker: %s took longer than job_timeout=%ss",
            request_target(snapshot),
            config.job_timeout,
        )
        return _error(504, "Gateway Timeout"), "timeout"
    except BodyTooLargeError as error:
        logger.error("asgi-worker: %s not stored: %s", request_target(snapshot), error)
        return _error(502, "Response Too Large"), "too-large"
    except ReplayError as error:
        logger.error(
            "asgi-worker: %s gave an invalid response: %s", request_target(snapshot), error
        )
        return _error(502, "Bad Gateway"), "invalid"
    except Exception:
        logger.exception("asgi-worker: %s raised", request_target(snapshot))
        return _error(500, "Internal Server Error"), "error"
    if response.handled is not None:
        logger.error(
            "asgi-worker: %s raised; a layer outside the cache answered it with %d, as it "
            "would a request from the server, and that answer is stored",
            request_target(snapshot),
            response.status,
            exc_info=response.handled,
        )
        return response, "error"  # for the log and the metrics: the app did fail
    return response, "stored"


async def _after_answer(
    replayed: ReplayedResponse, ends_at: float, snapshot: RequestSnapshot, config: Config
) -> None:
    """Wait for what the app does after its answer until `ends_at`; log how it ended.

    The answer is committed already (or is being committed): this work cannot change it.
    """
    assert replayed.rest is not None
    failure = await finish(replayed.rest, max(0.0, ends_at - time.monotonic()))
    if failure is not None and failure is replayed.handled:
        return  # an error handler answered it, then raised it again (Starlette's does)
    if isinstance(failure, LeftRunningError):
        logger.error(
            "asgi-worker: %s: the app was still running after its answer at "
            "job_timeout=%ss, and is cancelled (its answer is stored)",
            request_target(snapshot),
            config.job_timeout,
        )
    elif failure is not None:
        logger.error(
            "asgi-worker: %s: the app raised after its answer (its answer is stored)",
            request_target(snapshot),
            exc_info=failure,
        )


def stored(
    replayed: ReplayedResponse, now: float | None = None, *, apart: str | None = None
) -> StoredResponse:
    """The entry to keep for a response: hop-by-hop headers dropped, framed as HTTP asks.

    `now` is its `stored_at` (by default this host's time; a job gives the store's).

    `Content-Length` is the stored body's, except where RFC 9110 section 8.6 rules it
    out: a 1xx or 204 has none (and no body); a 304 has no body, and keeps the length the
    app gave it (its 200's), or none.

    `apart`: the body is stored apart under this version (`Write.body`); the entry is
    its head, and never joins the body.
    """
    status = replayed.status
    headers = [(name, value) for name, value in replayed.headers if name not in _NOT_STORED]
    body = b""
    if not _has_body(status):
        if status == 304:
            given = next((pair for pair in replayed.headers if pair[0] == b"content-length"), None)
            headers.extend(() if given is None else (given,))
    else:
        headers.append((b"content-length", str(replayed.length).encode()))
        if apart is None:
            body = replayed.body
    return StoredResponse(
        status=status,
        headers=tuple(headers),
        body=body,
        stored_at=time.time() if now is None else now,
        apart=None if apart is None else Apart(apart, replayed.length),
    )


def _has_body(status: int) -> bool:
    """Whether a response of `status` has a body (not a 1xx, 204 or 304)."""
    return status >= 200 and status not in (204, 304)


_NO_ANSWER = ReplayedResponse(0, (), ())
"""Stands for the answer of a live stream, which is never stored."""


def _error(status: int, text: str) -> ReplayedResponse:
    # No detail of the failure reaches the client: that is what the worker log is for.
    return ReplayedResponse(
        status,
        ((b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")),
        (text.encode(),),
    )
