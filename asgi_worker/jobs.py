"""Run one replay job: replay the snapshot, turn the outcome into an entry, commit it.

Independent of the queue: the arq worker calls `run_job`, and so will any other runner.
Every path ends in a commit (the app's response or a short-lived error response), which
also releases the claim, so no request is left waiting on a job that has ended
(DESIGN.md principle 4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp

from .codec import CorruptEntryError, StoredResponse, decode_snapshot, encode_response
from .config import Config
from .keys import Headers, RequestSnapshot
from .replay import BodyTooLargeError, ReplayedResponse, ReplayError, replay
from .store import Store

logger = logging.getLogger("asgi_worker")

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


async def run_job(
    app: ASGIApp,
    store: Store,
    config: Config,
    snapshot_bytes: bytes,
    token: str,
    *,
    state: Mapping[str, Any] | None = None,
) -> str:
    """Replay one request and store the result; returns a word for the job log."""
    try:
        snapshot = decode_snapshot(snapshot_bytes)
    except CorruptEntryError as error:
        # Without a snapshot there is no key to release; the claim lease runs out.
        logger.error("asgi-worker: dropping a job with an unreadable snapshot: %s", error)
        return "corrupt-job"
    replayed, outcome = await _replay_or_error(app, snapshot, config, state)
    ttl = config.ttl if outcome == "stored" and replayed.status < 500 else config.error_ttl
    await store.commit(snapshot.digest, token, encode_response(stored(replayed)), ttl)
    return outcome


async def _replay_or_error(
    app: ASGIApp, snapshot: RequestSnapshot, config: Config, state: Mapping[str, Any] | None
) -> tuple[ReplayedResponse, str]:
    """The app's response, or the error response that stands for its failure."""
    where = f"{snapshot.path}?{snapshot.query_string.decode('latin-1')}"
    deadline = asyncio.timeout(config.job_timeout)
    try:
        async with deadline:
            response = await replay(
                app, snapshot, max_body_bytes=config.max_body_bytes, state=state
            )
        return response, "stored"
    except TimeoutError:
        if not deadline.expired():
            logger.exception("asgi-worker: %s raised", where)
            return _error(500, "Internal Server Error"), "error"
        logger.error("asgi-worker: %s took longer than job_timeout=%ss", where, config.job_timeout)
        return _error(504, "Gateway Timeout"), "timeout"
    except BodyTooLargeError as error:
        logger.error("asgi-worker: %s not stored: %s", where, error)
        return _error(502, "Response Too Large"), "too-large"
    except ReplayError as error:
        logger.error("asgi-worker: %s gave an invalid response: %s", where, error)
        return _error(502, "Bad Gateway"), "invalid"
    except Exception:
        logger.exception("asgi-worker: %s raised", where)
        return _error(500, "Internal Server Error"), "error"


def stored(replayed: ReplayedResponse, now: float | None = None) -> StoredResponse:
    """The entry to keep for a response: hop-by-hop headers dropped, length made exact."""
    headers: Headers = (
        *((name, value) for name, value in replayed.headers if name not in _NOT_STORED),
        (b"content-length", str(len(replayed.body)).encode()),
    )
    return StoredResponse(
        status=replayed.status,
        headers=headers,
        body=replayed.body,
        stored_at=time.time() if now is None else now,
    )


def _error(status: int, text: str) -> ReplayedResponse:
    # No detail of the failure reaches the client: that is what the worker log is for.
    return ReplayedResponse(
        status,
        ((b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")),
        text.encode(),
    )
