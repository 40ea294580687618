"""The responses the middleware itself sends: a stored hit, 202 Accepted, 400, 503."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.types import Send

from asgi_worker.core.codec import StoredResponse
from asgi_worker.core.freshness import none_match

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


_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

BODY_CHUNK = 256 * 1024
"""Bytes of a body stored apart read from the store (and sent on) at a time: what one
hit holds of it in the web process."""

BodyReader = Callable[[int, int], Awaitable[bytes | None]]
"""Reads bytes `start` to `stop` of a body stored apart: None if the body is gone."""


class BodyUnreadableError(Exception):
    """The first read of a body stored apart failed (the store is down).

    Nothing was sent: the caller can still answer as it does when the lookup fails.
    """


class BodyGoneError(Exception):
    """A body stored apart went away (or could not be read) while it was being sent.

    Invalidated, expired, evicted, or the store failed: the response is cut short, never
    completed wrongly. Raised to the server, which closes the connection: the client
    sees fewer bytes than the `Content-Length` (or the `Content-Range`) it promised.
    """

    def __init__(self, sent: int, length: int) -> None:
        super().__init__(f"the body went away after {sent} of {length} bytes")
        self.sent = sent
        self.length = length


async def send_stored(
    response: StoredResponse,
    send: Send,
    *,
    now: float,
    head: bool,
    stale: bool = False,
    if_none_match: bytes | None = None,
    ranges: bytes | None = None,
    if_range: bytes | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
    read: BodyReader | None = None,
) -> bool:
    """Serve a stored response with `Age` and `Cache-Status`; no body for HEAD.

    `Age` is `now` minus `response.stored_at`, both on one clock (RFC 9111 section
    4.2.3: the cache's own): the store's time of the lookup that read the response.

    A matching `If-None-Match` gets `304 Not Modified` with the headers RFC 9110
    section 15.4.5 asks for. A `Range` of one byte range (`ranges`, the header) gets
    `206 Partial Content` with exactly those bytes, or `416` if none of them exist, unless
    an `If-Range` does not match the ETag (RFC 9110 section 14); several ranges get the
    whole body.

    A body stored apart (`response.apart`) is read through `read` a `BODY_CHUNK` at a
    time, each chunk sent before the next is read. Returns False, having sent nothing, if
    that body was gone before its first byte (the caller treats it as a miss); raises
    `BodyUnreadableError` if that first read failed, `BodyGoneError` if the body goes
    (or a read fails) later. A HEAD or a 304 reads none of it.
    """
    ours = [
        (b"age", str(max(0, int(now - response.stored_at))).encode()),
        (b"cache-status", CACHE_STATUS_STALE if stale else CACHE_STATUS_HIT),
        *extra,
    ]
    etag = next((value for name, value in response.headers if name == b"etag"), None)
    if if_none_match is not None and etag is not None and none_match(if_none_match, etag):
        kept = [pair for pair in response.headers if pair[0] in _NOT_MODIFIED_HEADERS]
        await send({"type": "http.response.start", "status": 304, "headers": kept + ours})
        await send({"type": "http.response.body", "body": b""})
        return True
    length = response.length
    status, headers = response.status, [*response.headers, *ours]
    start, stop = 0, length
    wanted = _wanted(response, ranges, if_range, etag)
    try:
        span = None if wanted is None else byte_range(wanted, length)
    except RangeNotSatisfiableError:  # RFC 9110 section 15.5.17: none of the bytes exist
        headers = [(b"content-range", b"bytes */%d" % length), *ours, (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 416, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return True
    if span is not None:
        start, stop = span
        status = 206
        headers = [pair for pair in headers if pair[0] != b"content-length"]
        headers += [
            (b"content-range", b"bytes %d-%d/%d" % (start, stop - 1, length)),
            (b"content-length", b"%d" % (stop - start)),
        ]
    if response.apart is None or head:
        body = b"" if head else response.body[start:stop] if span else response.body
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
    assert read is not None, "a body stored apart needs a reader"
    try:
        chunk = await read(start, min(stop, start + BODY_CHUNK))
    except Exception as error:
        raise BodyUnreadableError(str(error)) from error
    if chunk is None:
        return False
    await send({"type": "http.response.start", "status": status, "headers": headers})
    at = start
    while True:
        at += len(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": at < stop})
        if at >= stop:
            return True
        try:
            next_chunk = await read(at, min(stop, at + BODY_CHUNK))
        except Exception as error:  # whatever failed, the response cannot be completed
            raise BodyGoneError(at - start, stop - start) from error
        if next_chunk is None:
            raise BodyGoneError(at - start, stop - start)
        chunk = next_chunk


def _wanted(
    response: StoredResponse, ranges: bytes | None, if_range: bytes | None, etag: bytes | None
) -> bytes | None:
    """The `Range` to honour, or None: only on a 200, only if `If-Range` (if any) matches.

    `If-Range` needs a strong match of the ETag (RFC 9110 section 13.1.5); a date in it
    is taken as no match (the whole body is sent, which is always correct).
    """
    if ranges is None or response.status != 200:
        return None
    if if_range is not None:
        strong = etag is not None and not etag.startswith(b"W/")
        if not strong or if_range.strip() != etag:
            return None
    return ranges


class RangeNotSatisfiableError(ValueError):
    """A `Range` that asks for no byte the body has: answered `416`."""


def byte_range(ranges: bytes, length: int) -> tuple[int, int] | None:
    """The bytes (start, stop) one `Range` header asks of a body of `length`.

    None for a header not served as a range (the whole body is sent): not `bytes=`,
    malformed, or several ranges. `RangeNotSatisfiableError` if the one range asks for
    no byte that exists. RFC 9110 section 14.1.2: `first-last`, `first-`, `-suffix`.
    """
    unit, _, spec = ranges.strip().partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = (part.strip() for part in spec.strip().partition(b"-"))
    if not dash or not (first or last) or not all(p.isdigit() for p in (first, last) if p):
        return None
    if not first:  # the last `last` bytes
        suffix = int(last)
        if not suffix or not length:
            raise RangeNotSatisfiableError(ranges)
        return max(0, length - suffix), length
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored (RFC 9110 section 14.1.1)
    if start >= length:
        raise RangeNotSatisfiableError(ranges)
    return start, length if not last else min(int(last) + 1, length)


async def send_accepted(
    send: Send,
    *,
    retry_after: int,
    extra: Sequence[tuple[bytes, bytes]] = (),
    no_worker: bool = False,
    state: bytes | None = None,
    head: bool = False,
) -> None:
    """202: the response is being prepared; ask again after `retry_after` seconds.

    The request's own URL is the status monitor: polling it returns 202 until the
    response is stored, then the response. No separate status resource is minted, so
    there is nothing else to expire, secure or clean up.

    `no_worker`: no worker has reported on the queue for too long (`queue.WorkerWatch`);
    `Cache-Status` says `detail=no-worker`.

    `state`: the job's state as JSON (`web/job_state.py`), for a client that accepts it;
    otherwise the body is empty.
    """
    status = CACHE_STATUS_NO_WORKER if no_worker else CACHE_STATUS_MISS
    if state is None:
        await _send_plain(send, 202, retry_after, status, b"", extra, head=head)
    else:
        await _send_plain(
            send, 202, retry_after, status, state, extra, head=head, content_type=_JSON
        )


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
        (b"content-type", _TEXT),
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
    content_type: bytes = _TEXT,
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
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
