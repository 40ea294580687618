"""`WorkerMiddleware`: serve GETs from the cache, hand misses to a worker, answer 202."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Mapping
from typing import Any

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backend import Backend, open_backend
from .codec import CorruptEntryError, StoredResponse, decode_response, encode_snapshot
from .config import Config
from .keys import RedisKeys, RequestSnapshot, snapshot_from_scope
from .memory import InProcessQueue
from .policy import Policy
from .queue import Job
from .responses import send_accepted, send_stored, send_unavailable
from .store import Lookup, Outcome

logger = logging.getLogger("asgi_worker")

# Errors that mean "the backend cannot answer now", as opposed to bugs.
_BACKEND_ERRORS = (RedisError, OSError)


class WorkerMiddleware:
    """Pure ASGI middleware: GET and HEAD are answered only from the cache.

    A hit is served from the stored response. A miss answers `202 Accepted` at once and
    makes sure exactly one job exists to replay the request in a worker. Everything else
    (other methods, websockets, credentials, excluded paths, the worker's own replays)
    goes straight to the wrapped app.
    """

    def __init__(self, app: ASGIApp, *, config: Config) -> None:
        self.app = app
        self.config = config
        self._policy = Policy(config)
        self._keys = RedisKeys(config.prefix)
        # Opened on the first request, inside the server's event loop; closed at shutdown.
        self._backend: Backend | None = None
        # The server's lifespan state, for replays run in this process (inline worker).
        self._lifespan_state: Mapping[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection."""
        if scope["type"] == "lifespan":
            self._lifespan_state = scope.get("state")
            await self.app(scope, self._closing_at_shutdown(receive), send)
        elif self._policy.handles(scope):
            await self._serve(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        snapshot = snapshot_from_scope(scope, self.config.vary)
        head = scope["method"] == "HEAD"
        try:
            found = await self._lookup(snapshot)
        except _BACKEND_ERRORS as error:
            logger.error("asgi-worker: cache backend unavailable: %r", error)
            if self.config.fail_open:
                await self.app(scope, receive, send)
            else:
                await send_unavailable(send, retry_after=self.config.retry_after, head=head)
            return
        if isinstance(found, Lookup):
            await send_accepted(send, retry_after=self.config.retry_after)
        else:
            await send_stored(found, send, head=head)

    async def _lookup(self, snapshot: RequestSnapshot) -> Lookup | StoredResponse:
        """One round trip in the common case; a job is enqueued only by the claimant."""
        backend = self._open()
        digest = snapshot.digest
        token = secrets.token_hex(8)
        found = await backend.store.lookup(digest, token)
        if found.outcome is Outcome.HIT:
            assert found.entry is not None
            try:
                return decode_response(found.entry)
            except CorruptEntryError as error:
                logger.error("asgi-worker: discarding corrupt entry %s: %s", digest, error)
                await backend.store.discard(digest)
                found = await backend.store.lookup(digest, token)
                if found.outcome is Outcome.HIT:
                    return found  # a fresh entry raced in; the client asks again
        if found.outcome is Outcome.CLAIMED:
            job = Job(self._keys.job_id(digest, token), encode_snapshot(snapshot), token)
            try:
                await backend.queue.enqueue(job)
            except BaseException:
                # Let the next request claim again rather than wait for the lease.
                await _quietly(backend.store.release(digest, token))
                raise
        return found

    async def drain(self) -> int:
        """Wait for the jobs running in this process (in-process backends only).

        Returns how many jobs finished; 0 when jobs go to an arq worker instead.
        """
        queue = self._backend.queue if self._backend is not None else None
        return await queue.drain() if isinstance(queue, InProcessQueue) else 0

    def _open(self) -> Backend:
        if self._backend is None:
            self._backend = open_backend(
                self.config, app=self.app, state=lambda: self._lifespan_state
            )
        return self._backend

    def _closing_at_shutdown(self, receive: Receive) -> Receive:
        async def receive_then_close() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self._backend is not None:
                backend, self._backend = self._backend, None
                await backend.close()
            return message

        return receive_then_close


async def _quietly(step: Awaitable[object]) -> None:
    """Best-effort clean-up while another error is already on its way to the caller."""
    try:
        await step
    except Exception as error:  # the original error matters more than this one
        logger.warning("asgi-worker: clean-up failed: %r", error)
