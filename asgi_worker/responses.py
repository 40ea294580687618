"""The responses the middleware itself sends: a stored hit, 202 Accepted, 400, 503."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import Send

from .codec import StoredResponse
from .freshness import none_match

# What a 304 carries of the stored response (RFC 9110 section 15.4.5).
_NOT_MODIFIED_HEADERS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)

# RFC 9211 Cache-Status values, with our cache's name first.
CACHE_STATUS_HIT = b"asgi-worker; hit"
CACHE_STATUS_STALE = b"asgi-worker; hit; fwd=stale"
CACHE_STATUS_MISS = b"asgi-worker; fwd=uri-miss"
CACHE_STATUS_UNAVAILABLE = b"asgi-worker; fwd=uri-miss; detail=backend-unavailable"
CACHE_STATUS_QUEUE_FULL = b"asgi-worker; fwd=uri-miss; detail=queue-full"
CACHE_STATUS_NO_WORKER = b"asgi-worker; fwd=uri-miss; detail=no-worker"


async def send_stored(
    response: StoredResponse,
    send: Send,
    *,
    now: float,
    head: bool,
    stale: bool = False,
    if_none_match: bytes | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Serve a stored response with `Age` and `Cache-Status`; no body for HEAD.

    `Age` is `now` minus `response.stored_at`, both on one clock (RFC 9111 section
    4.2.3: the cache's own): the store's time of the lookup that read the response.

    A matching `If-None-Match` gets `304 Not Modified` with the headers RFC 9110
    section 15.4.5 asks for.
    """
    ours = [
        (b"age", str(max(0, int(now - response.stored_at))).encode()),
        (b"cache-status", CACHE_STATUS_STALE if stale else CACHE_STATUS_HIT),
        *extra,
    ]
    if if_none_match is not None:
        etag = next((value for name, value in response.headers if name == b"etag"), None)
        if etag is not None and none_match(if_none_match, etag):
            kept = [pair for pair in response.headers if pair[0] in _NOT_MODIFIED_HEADERS]
            await send({"type": "http.response.start", "status": 304, "headers": kept + ours})
            await send({"type": "http.response.body", "body": b""})
            return
    headers = [*response.headers, *ours]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def send_accepted(
    send: Send,
    *,
    retry_after: int,
    extra: Sequence[tuple[bytes, bytes]] = (),
    no_worker: bool = False,
) -> None:
    """202: the response is being prepared; ask again after `retry_after` seconds.

    The request's own URL is the status monitor: polling it returns 202 until the
    response is stored, then the response. No separate status resource is minted, so
    there is nothing else to expire, secure or clean up.

    `no_worker`: no worker has reported on the queue for too long (`queue.WorkerWatch`);
    `Cache-Status` says `detail=no-worker`.
    """
    status = CACHE_STATUS_NO_WORKER if no_worker else CACHE_STATUS_MISS
    await _send_plain(send, 202, retry_after, status, b"", extra)


async def send_unavailable(
    send: Send, *, retry_after: int, head: bool, queue_full: bool = False
) -> None:
    """503: the cache backend cannot be reached, or its queue takes no more jobs now."""
    status = CACHE_STATUS_QUEUE_FULL if queue_full else CACHE_STATUS_UNAVAILABLE
    await _send_plain(send, 503, retry_after, status, b"Service Unavailable", head=head)


async def send_bad_request(send: Send, *, head: bool, reason: bytes) -> None:
    """400 for a request the cache refuses to key (a bad or unknown Host): no job, no lookup."""
    body = b"Bad Request: " + reason
    headers = [
        (b"cache-control", b"no-store"),
        (b"content-length", str(len(body)).encode()),
        (b"content-type", b"text/plain; charset=utf-8"),
    ]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _send_plain(
    send: Send,
    status: int,
    retry_after: int,
    cache_status: bytes,
    body: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
    *,
    head: bool = False,
) -> None:
    """A short answer of our own; to a HEAD, framed as the GET's (its length), no body."""
    headers = [
        *extra,
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
        (b"cache-status", cache_status),
        (b"content-length", str(len(body)).encode()),
    ]
    if body:
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
