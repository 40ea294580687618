"""The responses the middleware itself sends: a stored hit, 202 Accepted, 503."""

from __future__ import annotations

import time

from starlette.types import Send

from .codec import StoredResponse

# RFC 9211 Cache-Status values, with our cache's name first.
CACHE_STATUS_HIT = b"asgi-worker; hit"
CACHE_STATUS_MISS = b"asgi-worker; fwd=uri-miss"
CACHE_STATUS_UNAVAILABLE = b"asgi-worker; fwd=uri-miss; detail=backend-unavailable"


async def send_stored(response: StoredResponse, send: Send, *, head: bool) -> None:
    """Serve a stored response with `Age` and `Cache-Status`; no body for HEAD."""
    age = max(0, int(time.time() - response.stored_at))
    headers = [
        *response.headers,
        (b"age", str(age).encode()),
        (b"cache-status", CACHE_STATUS_HIT),
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def send_accepted(send: Send, *, retry_after: int) -> None:
    """202: the response is being prepared; ask again after `retry_after` seconds."""
    await _send_plain(send, 202, retry_after, CACHE_STATUS_MISS, b"")


async def send_unavailable(send: Send, *, retry_after: int, head: bool) -> None:
    """503: the cache backend cannot be reached."""
    await _send_plain(
        send, 503, retry_after, CACHE_STATUS_UNAVAILABLE, b"" if head else b"Service Unavailable"
    )


async def _send_plain(
    send: Send, status: int, retry_after: int, cache_status: bytes, body: bytes
) -> None:
    headers = [
        (b"retry-after", str(retry_after).encode()),
        (b"cache-control", b"no-store"),
        (b"cache-status", cache_status),
        (b"content-length", str(len(body)).encode()),
    ]
    if body:
        headers.append((b"content-type", b"text/plain; charset=utf-8"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
