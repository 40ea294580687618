"""`WorkerMiddleware`: serve GETs from the cache, hand misses to a worker, answer 202."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import sniffio
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_worker.backends.base import Job, JobQueue, JobState, QueueFull, Store
from asgi_worker.backends.memory import InProcessQueue
from asgi_worker.backends.redis.queue import ArqQueue
from asgi_worker.core.app_layers import walk
from asgi_worker.core.codec import (
    Apart,
    CorruptEntryError,
    StoredResponse,
    decode_response,
    encode_snapshot,
)
from asgi_worker.core.config import Config
from asgi_worker.core.discovery import CacheLayer
from asgi_worker.core.encodings import accepts_gzip
from asgi_worker.core.keys import (
    Client,
    HostNotAllowedError,
    InvalidHostError,
    RedisKeys,
    RequestSnapshot,
    scope_client,
)
from asgi_worker.core.normalize import KeyRules
from asgi_worker.core.policy import Policy
from asgi_worker.core.replay import replay_marker
from asgi_worker.observability.from_config import observer_for
from asgi_worker.observability.observer import Observer, RequestRecord
from asgi_worker.web.backend import Backend, ReplayEntrance, open_backend
from asgi_worker.web.decoded_bodies import DecodedBodies
from asgi_worker.web.job_state import accepts_json, state_body
from asgi_worker.web.key_memo import KeyMemo
from asgi_worker.web.lost_jobs import GRACE_MARGIN, LostJobs
from asgi_worker.web.responses import (
    BodyGoneError,
    BodyReader,
    BodyUnreadableError,
    send_accepted,
    send_bad_request,
    send_stored,
    send_unavailable,
)
from asgi_worker.web.single_flight import SingleFlight
from asgi_worker.web.waiting import Gone, hold, parse_prefer

logger = logging.getLogger("asgi_worker")

# Errors that mean "the backend cannot answer now", as opposed to bugs.
_BACKEND_ERRORS = (RedisError, OSError, TimeoutError)

# What `_serve` says it did, for an observer; cheap constants when there is none.
_HIT, _NEAR_HIT, _STALE, _MISS = "hit", "near-hit", "stale", "miss"


class WorkerMiddleware(CacheLayer):
    """ASGI middleware that answers GET and HEAD only from a cache a worker fills.

    A hit is served from the stored response, with `Age`, `ETag` and `Cache-Status`. A
    miss answers `202 Accepted` with `Retry-After` at once, and makes sure exactly one
    job exists to replay the request: in an arq worker (`worker_settings`,
    `asgi-worker worker`), or in this process with `memory://` or `inline_worker`.
    Everything else (other methods, websockets, requests with credentials, excluded
    paths) goes straight to the wrapped app. With Redis down the answer is `503`, or
    the app's with `fail_open`.

    ```python
    app.add_middleware(WorkerMiddleware, config=Config())  # Starlette, FastAPI
    app = WorkerMiddleware(app, config=Config())           # any ASGI app
    ```

    A replay enters at the top of the app you serve, as the server's requests do, and
    what the app inside this middleware answers to it is the response stored.
    """

    def __init__(self, app: ASGIApp, *, config: Config, observer: Observer | None = None) -> None:
        """Wrap `app` in the cache `config` describes.

        Args:
            app: The ASGI app whose GET responses are cached; replays reach it too.
            config: The settings, the same as the worker's.
            observer: Measures or traces requests. By default the one `config` asks for
                (`metrics`, `tracing`); with neither, none at all, at no cost.
        """
        self.app = app
        self.config = config
        self._observer = observer if observer is not None else observer_for(config)
        self._exposition = None if self._observer is None else self._observer.exposition()
        self._policy = Policy(config)
        self._keys = RedisKeys(config.prefix)
        self._guard = config.credential_guard()
        self._key_memo = KeyMemo(config.vary, self._guard, KeyRules.from_config(config))
        # Opened on the first request, inside the server's event loop; closed at shutdown.
        self._backend: Backend | None = None
        # The server's lifespan state, for replays run in this process (inline worker).
        self._lifespan_state: Mapping[str, Any] | None = None
        # Claim tokens: unique per claim, and cheap (no syscall) on the hit path where
        # they go unused. The random part tells processes and restarts apart.
        self._token_prefix = secrets.token_hex(6)
        self._token_counter = itertools.count()
        self._inflight: SingleFlight[_Found | _Missed] = SingleFlight()
        # Claims whose job was lost (evicted, its worker killed) are taken over.
        self._lost = LostJobs(self._keys, grace=config.redis_timeout + GRACE_MARGIN)
        # Where in-process replays enter the app: learned from the first request.
        self._entrance: ReplayEntrance | None = None
        # Gzip entries decoded for clients that accept no gzip, kept a while (compress).
        self._decoded = DecodedBodies(config.decoded_bodies_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection."""
        if scope["type"] == "lifespan":
            if (refusal := _unsupported_loop()) is not None:
                await _refuse_startup(refusal, receive, send)
                return
            self._lifespan_state = scope.get("state")
            await self.app(scope, self._closing_at_shutdown(receive), send)
        elif self._policy.handles(scope):
            if self._observer is None:
                await self._serve(scope, receive, send)
            else:
                await self._serve_observed(self._observer, scope, receive, send)
        else:
            marker = replay_marker(scope) if scope["type"] == "http" else None
            if marker is not None and marker.take(self.config.prefix):
                await marker.answer(self.app, scope, receive, send)  # the one stored
                return
            if self._observer is not None and marker is None and scope["type"] == "http":
                if self._serves_metrics(scope):  # a scrape with credentials, or excluded
                    await self._exposition(scope, receive, send)  # type: ignore[misc]
                    return
                self._observer.bypassed(scope)
            await self.app(scope, receive, send)

    def _serves_metrics(self, scope: Scope) -> bool:
        return self._exposition is not None and scope["path"] == self.config.metrics_path

    async def _serve_observed(
        self, observer: Observer, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """`_serve`, measured and traced; also serves the metrics at `metrics_path`."""
        if self._serves_metrics(scope):
            await self._exposition(scope, receive, send)  # type: ignore[misc]
            return
        if self._entrance is None:
            self._first_request(scope)  # binds the observer: a span is named by its route
        record = RequestRecord(scope)
        with observer.request(record):
            outcome = await self._serve(scope, receive, send, record)
            if outcome == _NEAR_HIT:
                record.near = True
                outcome = _HIT
            elif outcome == _MISS:
                outcome = "miss-enqueued" if record.enqueued else "miss-queued"
            record.outcome = outcome

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord | None = None,
        *,
        again: bool = False,
    ) -> str:
        """Answer one cache request; returns what it did (for an observer).

        `record` (with an observer) is marked if this request's lookup enqueued the job.
        `again`: the entry found first had lost its body stored apart, and was discarded.
        """
        head = scope["method"] == "HEAD"
        try:
            snapshot, digest = self._key_memo.key(scope)
        except InvalidHostError as error:
            logger.info("asgi-worker: 400 for %s", error)
            reason = b"host not served" if isinstance(error, HostNotAllowedError) else b"bad Host"
            await send_bad_request(send, head=head, reason=reason)
            return "bad-request"
        if self._entrance is None:
            self._first_request(scope)
        applied: list[tuple[bytes, bytes]] = []
        waited = False
        # One deadline for the request's Redis work: its lookup, the enqueue and the hints
        # of a 202 all end by it (a timer costs the same as `asyncio.timeout`'s).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.redis_timeout
        try:
            client = scope_client(scope) if self.config.replay_client else None
            found = await self._lookup(snapshot, digest, client, record, deadline)
            if isinstance(found, _Missed):
                preference = parse_prefer(_headers(scope, b"prefer"))
                # respond-async alone: the 202 at once. With wait=N (RFC 7240 section 4.3:
                # "respond-async, wait=N") we hold up to N seconds, then answer 202.
                seconds = min(preference.wait or 0.0, self.config.max_wait)
                if seconds > 0:
                    # N seconds from the request's arrival: the client's own choice. Each
                    # look in the hold is bounded as a lookup is, and the hints after it
                    # by redis_timeout from the hold's end.
                    until = deadline - self.config.redis_timeout + seconds
                    held = await self._wait_for(snapshot, digest, client, until, receive, record)
                    if isinstance(held, Gone):
                        return "gone"  # the client went away while waiting: nobody to answer
                    deadline = min(until, loop.time()) + self.config.redis_timeout
                    found = held
                    if isinstance(found, _Found):
                        waited = True
                        # The hold we granted: the client's wait, or less if capped.
                        applied.append((b"preference-applied", b"wait=%d" % math.ceil(seconds)))
                if isinstance(found, _Missed) and preference.respond_async:
                    applied.append((b"preference-applied", b"respond-async"))
        except QueueFull as error:
            # Admission control: nothing was queued and the claim is released.
            logger.warning("asgi-worker: 503, %s", error)
            retry_after = self.config.retry_after
            await send_unavailable(send, retry_after=retry_after, head=head, queue_full=True)
            return "queue-full"
        except _BACKEND_ERRORS as error:
            return await self._unavailable(error, scope, receive, send)
        if isinstance(found, _Missed):
            state = None
            if found.job_id is not None and accepts_json(_headers(scope, b"accept")):
                job, typical = await self._job_state(found.job_id, snapshot.path, deadline)
                retry_after = self._retry_after_of(typical)
                state = state_body(job, typical, self.config.max_jobs)
            else:
                retry_after = await self._retry_after(snapshot, deadline)
            await send_accepted(
                send,
                retry_after=retry_after,
                extra=applied,
                no_worker=await self._no_worker(deadline),
                state=state,
                head=head,
            )
            return _MISS
        if found.response.hit_for_pass:
            await self.app(scope, receive, send)  # the app said private: never share it
            return "pass"
        response = found.response
        if response.coded is not None:  # gzip stored: this client's representation of it
            try:
                accepts = accepts_gzip(_headers(scope, b"accept-encoding"))
                response = self._decoded.select(digest, response, accepts)
            except CorruptEntryError as error:
                logger.error("asgi-worker: discarding corrupt entry %s: %s", digest, error)
                return await self._after_discard(
                    digest, None, scope, receive, send, record, again, applied
                )
        if_none_match = _headers(scope, b"if-none-match")
        try:
            served = await send_stored(
                response,
                send,
                now=found.now,
                head=head,
                stale=found.stale,
                if_none_match=b", ".join(if_none_match) if if_none_match else None,
                ranges=_header(scope, b"range"),
                if_range=_header(scope, b"if-range"),
                extra=applied,
                read=None if response.apart is None else self._reader(digest, response.apart),
            )
        except BodyUnreadableError as error:
            return await self._unavailable(error, scope, receive, send)
        except BodyGoneError as error:
            # The server closes the connection: the client sees a truncated response.
            logger.error(
                "asgi-worker: the body of %s went away while it was sent (%s): the response "
                "is cut short",
                digest,
                error,
            )
            raise
        if not served:
            assert response.apart is not None
            logger.warning(
                "asgi-worker: the body of %s is gone (expired, invalidated or evicted): "
                "the entry is discarded, a miss",
                digest,
            )
            version = response.apart.version
            return await self._after_discard(
                digest, version, scope, receive, send, record, again, applied
            )
        if waited:
            return "waited"
        return _STALE if found.stale else _NEAR_HIT if found.near else _HIT

    async def _after_discard(
        self,
        digest: str,
        version: str | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord | None,
        again: bool,
        applied: list[tuple[bytes, bytes]],
    ) -> str:
        """Discard the entry found, which cannot be served; then serve the request anew.

        `version`: discard only if the entry's body stored apart is still that one (see
        `Store.discard`). Looked up again, the request is a miss whose lookup claims the
        job; if it was looked up again already (`again`), it gets a 202.
        """
        backend = self._open()
        near = backend.near_cache()
        if near is not None:
            near.evict(digest)
        await _quietly(backend.store.discard(digest, version), within=self.config.redis_timeout)
        if not again:
            return await self._serve(scope, receive, send, record, again=True)
        await send_accepted(send, retry_after=self.config.retry_after, extra=applied)
        return _MISS

    async def _unavailable(
        self, error: BaseException, scope: Scope, receive: Receive, send: Send
    ) -> str:
        """Redis cannot answer: `503`, or the app's own answer with `fail_open`."""
        logger.error("asgi-worker: cache backend unavailable: %r", error)
        if self.config.fail_open:
            await self.app(scope, receive, send)
        else:
            head = scope["method"] == "HEAD"
            await send_unavailable(send, retry_after=self.config.retry_after, head=head)
        return "unavailable"

    def _reader(self, digest: str, apart: Apart) -> BodyReader:
        """Reads the body stored apart of `digest`'s entry, each read within redis_timeout."""
        store = self._open().store
        timeout = self.config.redis_timeout

        async def read(start: int, stop: int) -> bytes | None:
            async with asyncio.timeout(timeout):
                return await store.read_body(digest, apart.version, apart.length, start, stop)

        return read

    async def _retry_after(self, snapshot: RequestSnapshot, deadline: float) -> int:
        """`Retry-After` for a 202: fixed, or the path's typical job duration if adaptive.

        The typical duration is read only within what is left until `deadline` (the loop's
        time): a hint is not worth a later answer.
        """
        config = self.config
        if not config.adaptive_retry_after:
            return config.retry_after
        if deadline <= asyncio.get_running_loop().time():
            return config.retry_after  # a command cut off at once would cost its connection
        try:
            async with asyncio.timeout_at(deadline):
                typical = await self._open().store.typical_duration(snapshot.path)
        except _BACKEND_ERRORS:
            return config.retry_after  # the 202 matters more than its hint
        return self._retry_after_of(typical)

    def _retry_after_of(self, typical: float | None) -> int:
        """`Retry-After` given the path's typical job duration (None: not known)."""
        config = self.config
        if not config.adaptive_retry_after or typical is None:
            return config.retry_after
        return min(max(math.ceil(typical), config.retry_after), config.max_retry_after)

    async def _job_state(
        self, job_id: str, path: str, deadline: float
    ) -> tuple[JobState | None, float | None]:
        """The job's state and its path's typical duration, for a `202`'s JSON.

        Read side by side (the queue's Redis and the store's may differ): one round
        trip's time, within what is left until `deadline`. What cannot be read in time
        is not known (None): the 202 matters more than its hints.
        """
        if deadline <= asyncio.get_running_loop().time():
            return None, None
        backend = self._open()
        try:
            async with asyncio.timeout_at(deadline):
                state, typical = await asyncio.gather(
                    backend.queue.state(job_id),
                    backend.store.typical_duration(path),
                    return_exceptions=True,
                )
        except TimeoutError:
            return None, None
        for read in (state, typical):
            if isinstance(read, BaseException) and not isinstance(read, _BACKEND_ERRORS):
                raise read
        return (
            None if isinstance(state, BaseException) else state,
            None if isinstance(typical, BaseException) else typical,
        )

    async def _no_worker(self, deadline: float) -> bool:
        """True if no worker has reported on the queue for too long (arq backend only).

        Asked on a 202 only, never on a hit; reads Redis at most once per
        `queue.WORKER_CHECK_EVERY` seconds per process (see `queue.WorkerWatch`), and only
        within what is left until `deadline` (else the last answer stands).
        """
        queue = self._open().queue
        if not isinstance(queue, ArqQueue):
            return False  # in-process jobs: this process is the worker
        return await queue.worker_watch.check(deadline - asyncio.get_running_loop().time())

    async def _wait_for(
        self,
        snapshot: RequestSnapshot,
        digest: str,
        client: Client | None,
        until: float,
        receive: Receive,
        record: RequestRecord | None,
    ) -> _Found | _Missed | Gone:
        """Hold a miss until its response is stored, `until` passes, or the client leaves.

        `until` is the loop's time. Each look is bounded by `redis_timeout`, as a lookup.
        Past `until`, the last look's miss (none, if this process holds too many waiters).
        """
        backend = self._open()
        loop = asyncio.get_running_loop()
        bound = self.config.redis_timeout
        await backend.listen(min(until - loop.time(), bound))
        observer = self._observer
        if observer is not None:
            observer.waiting(1)
        missed = _Missed(None)

        async def look() -> _Found | None:
            nonlocal missed
            found = await self._lookup(snapshot, digest, client, record, loop.time() + bound)
            if isinstance(found, _Missed):
                missed = found
                return None
            return found

        try:
            held = await hold(backend.waiters, digest, look, until, receive)
            return missed if held is None else held
        finally:
            if observer is not None:
                observer.waiting(-1)

    async def _lookup(
        self,
        snapshot: RequestSnapshot,
        digest: str,
        client: Client | None,
        record: RequestRecord | None,
        deadline: float,
    ) -> _Found | _Missed:
        """One round trip in the common case; a job is enqueued only by the claimant.

        `client` is the address a job enqueued here replays (`Config.replay_client`). The
        lookup and the enqueue end by `deadline` (the loop's time), or raise `TimeoutError`.

        With `Config.coalesce`, a request arriving while a lookup of the same key is on its
        way in this process waits for that one instead of sending its own (single-flight):
        a hot key costs one round trip per round-trip time, not one per request. The
        `record` of the request whose lookup is sent is the one marked as the enqueuer.
        A request that waits shares the deadline of the one it waits for, which began
        first; if that one is cancelled, it looks itself, by its own deadline.
        """
        # The near cache is a dict read: no round trip to share, nothing to time out.
        near = self._open().near_cache()
        if near is not None and (cached := near.get(digest)) is not None:
            return _Found(cached, False, time.monotonic(), near=True)  # see `_near_copy`
        if not self.config.coalesce:
            return await self._timed_lookup(snapshot, digest, client, record, deadline)
        return await self._inflight.run(
            digest, lambda: self._timed_lookup(snapshot, digest, client, record, deadline)
        )

    async def _timed_lookup(
        self,
        snapshot: RequestSnapshot,
        digest: str,
        client: Client | None,
        record: RequestRecord | None,
        deadline: float,
    ) -> _Found | _Missed:
        observer = self._observer
        if observer is None:
            return await self._lookup_now(snapshot, digest, client, None, deadline)
        began = time.perf_counter()
        found = await self._lookup_now(snapshot, digest, client, record, deadline)
        observer.lookup(time.perf_counter() - began)
        return found

    async def _lookup_now(
        self,
        snapshot: RequestSnapshot,
        digest: str,
        client: Client | None,
        record: RequestRecord | None,
        deadline: float,
    ) -> _Found | _Missed:
        backend = self._open()
        near = backend.near_cache()
        store = backend.store
        token = f"{self._token_prefix}{next(self._token_counter):x}"
        try:
            # One timer for the whole lookup (the web client has no per-read timeout).
            async with asyncio.timeout_at(deadline):
                found = await store.lookup(digest, token, snapshot.path)
                response = None
                if found.entry is not None:
                    try:
                        response = decode_response(found.entry)
                    except CorruptEntryError as error:
                        logger.error("asgi-worker: discarding corrupt entry %s: %s", digest, error)
                        await store.discard(digest)
                        if not found.claimed:
                            found = await store.lookup(digest, token, snapshot.path)
        except (TimeoutError, asyncio.CancelledError):
            # Cut off, the lookup may have claimed all the same (Redis ran it, its reply
            # was lost): give that claim up, or the URL would wait out the lease.
            backend.releases.send(digest, token)
            raise
        claimed_at = found.claimed_at
        holder = found.holder
        if holder is not None and self._lost.due(digest, found.held_for):
            # Another request's claim, held long enough that its job must be queued by
            # now: if that job is lost, this request takes the claim over (see lost.py).
            try:
                async with asyncio.timeout_at(deadline):
                    claimed_at = await self._lost.take_over(
                        store, backend.queue, digest, holder, token, snapshot.path
                    )
            except (TimeoutError, asyncio.CancelledError) as error:
                # Cut off, the take-over may have gone through: give that claim up (the
                # next request claims at once). Past the deadline, the answer is a 202.
                backend.releases.send(digest, token)
                if not isinstance(error, TimeoutError):
                    raise
        if claimed_at is not None:
            job = self._job(snapshot, digest, client, token, claimed_at)
            try:
                async with asyncio.timeout_at(deadline):
                    await backend.queue.enqueue(job)
            except BaseException as error:
                await _release(backend, digest, token, deadline, error)
                if response is None or not isinstance(error, (*_BACKEND_ERRORS, QueueFull)):
                    raise
                # A stale copy is better than a 503: serve it, refresh on a later request.
                logger.error("asgi-worker: could not enqueue a refresh: %r", error)
            else:
                holder = token
                if record is not None:
                    record.enqueued = True
        if response is None:
            return _Missed(None if holder is None else self._keys.job_id(digest, holder))
        if near is not None and not found.stale and response.apart is None:
            # A body stored apart never enters the near cache: each hit streams it.
            near.put(digest, _near_copy(response, found.now))
        return _Found(response, found.stale, found.now)

    def _job(
        self,
        snapshot: RequestSnapshot,
        digest: str,
        client: Client | None,
        token: str,
        claimed_at: float,
    ) -> Job:
        """The job to enqueue for the claim `token` took at `claimed_at`."""
        # The snapshot may be another request's (`KeyMemo`): the address is this one's.
        payload = encode_snapshot(dataclasses.replace(snapshot, client=client), self._guard)
        observer = self._observer
        trace = None if observer is None else observer.carry()
        job_id = self._keys.job_id(digest, token)
        return Job(job_id, payload, token, claimed_at, snapshot.path, trace)

    @property
    def waiting(self) -> int:
        """How many requests this middleware holds now for `Prefer: wait`."""
        return 0 if self._backend is None else self._backend.waiters.count

    @property
    def opened(self) -> bool:
        """True once this middleware has opened its store and queue (on first use)."""
        return self._backend is not None

    @property
    def store(self) -> Store:
        """The store of the responses this middleware serves (opened on first use).

        What `Invalidator.for_app` invalidates.
        """
        return self._open().store

    @property
    def queue(self) -> JobQueue:
        """Where this middleware's jobs go (opened on first use): the dashboard's running jobs."""
        return self._open().queue

    @property
    def observer(self) -> Observer | None:
        """What measures this middleware's requests, if anything (the dashboard's counts)."""
        return self._observer

    async def drain(self) -> int:
        """Wait until the jobs running in this process have finished.

        Only with `memory://` or `inline_worker` do jobs run in the web process; with an
        arq worker there is nothing to wait for.

        Returns:
            How many jobs finished.
        """
        queue = self._backend.queue if self._backend is not None else None
        return await queue.drain() if isinstance(queue, InProcessQueue) else 0

    def _open(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(
                self.config,
                entrance=lambda: self._entrance or ReplayEntrance(self),
                state=lambda: self._lifespan_state,
                observer=self._observer,
            )
        return self._backend

    def _closing_at_shutdown(self, receive: Receive) -> Receive:
        async def receive_then_close() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                if self._backend is not None:
                    backend, self._backend = self._backend, None
                    await backend.close()
                if self._observer is not None:
                    await self._observer.close()  # writes its last counts, if any
            return message

        return receive_then_close

    def _first_request(self, scope: Scope) -> None:
        """Learn where replays enter, and share the backend of a twin, if the app has one.

        Litestar builds one middleware per route handler and method: with `memory://`,
        each would keep entries of its own, and a HEAD would miss what its GET stored.
        Middlewares of one app with equal configs share one backend, as they share Redis.

        Raises `RuntimeError` on an event loop other than asyncio's (a server without
        lifespan: with one, the startup refused it already).
        """
        if (refusal := _unsupported_loop()) is not None:
            raise RuntimeError(refusal)
        self._entrance = self._entrance_for(scope)
        if self._observer is not None:
            self._observer.bind(self._entrance.app)
        app = scope.get("app")
        if self._backend is not None or app is None:
            return
        for node, _ in walk(app):
            twin = isinstance(node, WorkerMiddleware) and node is not self
            if twin and node.config == self.config and node._backend is not None:
                self._backend = node._backend
                return

    def _entrance_for(self, scope: Scope) -> ReplayEntrance:
        """Where a replay of this request enters, as the arq worker's enters the served app.

        The framework's app in the scope (Starlette, FastAPI and Litestar put it there) if
        it reaches this middleware: it adds what it always adds to the scope. Below a
        Starlette `Mount` that app is the mounted sub-app; the outermost router (in
        `scope["router"]`) is entered instead, so the mount and the router that `url_for`
        uses are the served app's. Without either (Quart, Django, a plain ASGI app)
        nothing outside this middleware adds anything, and the replay enters here.
        """
        below_mount = "app_root_path" in scope
        fallback = ReplayEntrance(self, mounted=below_mount)
        for key in ("app", "router"):
            candidate = scope.get(key)
            if candidate is None or candidate is self:
                continue
            through_mount = self._reached_from(candidate)
            if through_mount is None:
                continue
            if through_mount or not below_mount:
                return ReplayEntrance(candidate)  # it sees the server's root path
            fallback = ReplayEntrance(candidate, mounted=True)
        return fallback

    def _reached_from(self, app: object) -> bool | None:
        """Whether `app` reaches this middleware through a `Mount`; None if not at all."""
        for node, through_mount in walk(app):
            if node is self:
                return through_mount
        return None


@dataclass(frozen=True, slots=True)
class _Missed:
    """No response stored yet."""

    job_id: str | None
    """The job that will store it: the one this lookup enqueued, or the claim holder's
    (None if no job runs, as under a back-off, or if it is not known)."""


@dataclass(frozen=True, slots=True)
class _Found:
    response: StoredResponse
    stale: bool
    now: float
    """The clock of `response.stored_at` at the lookup, for `Age`: the store's time."""
    near: bool = False


def _near_copy(response: StoredResponse, now: float) -> StoredResponse:
    """`response` to keep in the near cache, its `stored_at` on the monotonic clock.

    A near hit's `Age` counts on from the lookup's by this process's monotonic clock,
    which no other host's sets and no wall-clock step moves (`now`: the store's time of
    the lookup).
    """
    return dataclasses.replace(response, stored_at=response.stored_at - now + time.monotonic())


def _unsupported_loop() -> str | None:
    """Why this event loop cannot run the middleware, or None under asyncio.

    Redis clients, the queue and the worker are asyncio's (redis.asyncio, arq): under
    trio, say so at start-up in one line instead of failing inside the first request.
    """
    library = sniffio.current_async_library()
    if library == "asyncio":
        return None
    return (
        f"asgi-worker runs on asyncio only, and this server runs {library}: serve the app "
        "with an asyncio event loop (uvicorn, hypercorn's default asyncio worker, "
        "granian's asyncio loop)"
    )


async def _refuse_startup(refusal: str, receive: Receive, send: Send) -> None:
    """Answer the lifespan's startup with a failure that says why: the server stops."""
    logger.error("asgi-worker: %s", refusal)
    message = await receive()
    if message["type"] == "lifespan.startup":
        await send({"type": "lifespan.startup.failed", "message": refusal})


def _headers(scope: Scope, name: bytes) -> list[bytes]:
    return [bytes(value) for key, value in scope.get("headers") or () if key.lower() == name]


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The one value of header `name`; None if it is absent or given more than once."""
    values = _headers(scope, name)
    return values[0] if len(values) == 1 else None


async def _quietly(step: Awaitable[object], *, within: float) -> None:
    """Best-effort clean-up, given up after `within` seconds (a request never hangs on it)."""
    try:
        async with asyncio.timeout(within):
            await step
    except Exception as error:  # the original error matters more than this one
        logger.warning("asgi-worker: clean-up failed: %r", error)


async def _release(
    backend: Backend, digest: str, token: str, deadline: float, error: BaseException
) -> None:
    """Give up the claim of a job that `error` kept from the queue.

    So the next request claims again rather than wait for the lease. Sent within what is
    left until `deadline` (the loop's time); a release cut off there, or with no time left
    (or for a request cancelled), goes on in the background (`backend.Releases`), and the
    claim's lease is the fallback for one that never goes.
    """
    released = False
    try:
        if deadline > asyncio.get_running_loop().time() and not isinstance(
            error, asyncio.CancelledError
        ):
            async with asyncio.timeout_at(deadline):
                await backend.store.release(digest, token)
            released = True
    except _BACKEND_ERRORS:
        pass  # the error that kept the job from the queue is the one to report
    finally:
        if not released:
            backend.releases.send(digest, token)
