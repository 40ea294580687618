"""A Python client for worker-pattern endpoints: GET, and wait out `202 Accepted`.

`fetch()` asks once with `Prefer: wait=N` (RFC 7240: the server may hold the request up to
N seconds and answer directly), and while the answer is `202` it sleeps `Retry-After`
seconds and asks again, until a non-202 response or the overall `timeout`.

Needs httpx, an optional dependency: `pip install 'asgi-worker[client]'`. This module
imports it only when `fetch()` runs, so importing `asgi_worker.client` works without it.

```python
from asgi_worker.client import PendingTimeout, fetch

response = await fetch("http://127.0.0.1:8000/slow?n=100000", timeout=30)
```

With `on_progress`, each `202` asks for the job's state as JSON and passes it on as a
`JobProgress` (docs/progress.md).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

DEFAULT_RETRY_AFTER = 1.0
"""Seconds to wait when a 202 has no usable `Retry-After`."""
MIN_RETRY_AFTER = 0.05
"""The shortest pause between two requests, whatever `Retry-After` says."""

_DELTA_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")  # RFC 9110 delta-seconds (and decimals)
# With `Prefer: wait=N` the server holds a request up to N seconds: read that long, and more.
_READ_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class JobProgress:
    """Where the job behind a `202` stands, as the server's JSON `202` says (`on_progress`)."""

    status: str
    """`"queued"` or `"running"`."""
    progress: float | None
    """0.0 to 1.0, as the handler last reported (`asgi_worker.report_progress`); or None."""
    message: str | None
    """The handler's last message, if any."""
    position: int | None
    """Jobs due before this one on the queue (0: next), while queued and known."""
    eta_seconds: float | None
    """Seconds until the response is likely ready, from the path's typical duration."""
    response: httpx.Response
    """The `202` itself."""

    @classmethod
    def from_response(cls, response: httpx.Response) -> JobProgress | None:
        """The state a JSON `202` carries; None for an empty or unreadable body."""
        if not response.headers.get("content-type", "").startswith("application/json"):
            return None
        try:
            data: Any = json.loads(response.content)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("status"), str):
            return None

        def number(name: str) -> float | None:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            return float(value)

        position = data.get("position")
        message = data.get("message")
        return cls(
            status=data["status"],
            progress=number("progress"),
            message=message if isinstance(message, str) else None,
            position=position if isinstance(position, int) else None,
            eta_seconds=number("eta_seconds"),
            response=response,
        )


ProgressCallback = Callable[[JobProgress], Awaitable[object] | object]
"""`fetch`'s `on_progress`: a function or a coroutine function of one `JobProgress`."""

# With `on_progress`, the JSON 202 is asked for at the lowest weight that still names it,
# so that the app's own answer is negotiated as the caller's Accept alone would have it.
_JSON_TOO = "application/json;q=0.001"


class PendingTimeout(TimeoutError):
    """The response was still pending (`202 Accepted`) when the overall timeout ran out."""

    def __init__(
        self,
        url: str,
        *,
        attempts: int,
        timeout: float,
        last_response: httpx.Response | None,
    ) -> None:
        super().__init__(
            f"{url} still pending after {attempts} request(s) in {timeout:g} s "
            f"(last status: {last_response.status_code if last_response else 'none'})"
        )
        self.url = url
        """The URL asked for."""
        self.attempts = attempts
        """How many requests were sent (each answered 202, or cut short by the deadline)."""
        self.timeout = timeout
        """The overall timeout, in seconds."""
        self.last_response = last_response
        """The last `202` received, or `None` if no response came back in time."""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` value asks to wait, or `None` if it is missing or invalid.

    Both forms of RFC 9110 section 10.2.3: delta-seconds (`"3"`; decimals are accepted too)
    and an HTTP-date (`"Wed, 21 Oct 2015 07:28:00 GMT"`), counted from `now` (default: the
    current time). A date in the past means 0.
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.match(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, origin unknown (RFC 5322)
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def retry_delay(value: str | None, *, max_retry_after: float) -> float:
    """The pause before asking again, for a `Retry-After` value.

    Missing or invalid: `DEFAULT_RETRY_AFTER`. Always within
    `[MIN_RETRY_AFTER, max(max_retry_after, MIN_RETRY_AFTER)]`.
    """
    seconds = parse_retry_after(value)
    if seconds is None:
        seconds = DEFAULT_RETRY_AFTER
    return max(MIN_RETRY_AFTER, min(seconds, max_retry_after))


async def fetch(
    url: str,
    *,
    client: httpx.AsyncClient | None = None,
    # The polling budget: PendingTimeout reports what happened within it, which a caller's
    # asyncio.timeout() could not. Hence the `timeout` parameter ruff's ASYNC109 flags.
    timeout: float = 30.0,  # noqa: ASYNC109
    wait: float | None = 5.0,
    headers: Mapping[str, str] | None = None,
    max_retry_after: float = 10.0,
    on_progress: ProgressCallback | None = None,
) -> httpx.Response:
    """GET `url` until the answer is not `202 Accepted`; return that response.

    - `client`: an `httpx.AsyncClient` to send with (a path such as `"/slow?n=5"` needs one
      with a `base_url`). Without one, a client is made for this call and closed after it.
    - `timeout`: seconds for the whole exchange, every request and pause included. When it
      runs out, `PendingTimeout` is raised; a request in flight then is cancelled.
    - `wait`: seconds the server may hold each request before answering 202, sent as
      `Prefer: wait=N` in whole seconds, always less than the time left. `None` (or under
      one second) sends no `Prefer`. Servers that do not honour it just answer 202 at once.
    - `headers`: extra request headers. A `Prefer` given here is kept, with `wait=N` added.
    - `max_retry_after`: the longest pause between requests, whatever `Retry-After` says
      (see `retry_delay`). Pauses never run past the deadline: when the next request
      would come after it, `fetch` waits out the time left and raises `PendingTimeout`.

    - `on_progress`: called with a `JobProgress` for each `202` (awaited if it is a
      coroutine function). The requests then also accept `application/json` (at
      `q=0.001`, after the caller's `Accept`), which the server answers with the job's
      state; a `202` without one is not passed on. For a bar that moves every
      `Retry-After`, pass `wait=None`: a held request answers only when its wait ends.

    Any status other than 202 (200, 404, a stored 500, a 503 while the cache is down) is
    returned as it is. Transport errors (`httpx.TransportError`) are not retried.

    Tracing: every request sends the same W3C `traceparent`, so the 202s, the job they
    started and the final response are one trace (docs/tracing.md): the one in `headers`
    if given, else, with the OpenTelemetry API installed, the current span's.
    """
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number > 0, not {timeout!r}")
    if wait is not None and not (math.isfinite(wait) and wait >= 0):
        raise ValueError(f"wait must be a finite number >= 0 or None, not {wait!r}")
    if not max_retry_after > 0:
        raise ValueError(f"max_retry_after must be > 0, not {max_retry_after!r}")
    try:
        import httpx
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "asgi_worker.client needs httpx: pip install 'asgi-worker[client]'"
        ) from error

    headers = _traced(headers)
    if on_progress is not None:
        headers = _accepting_json(headers)
    if client is not None:
        return await _poll(client, url, timeout, wait, headers, max_retry_after, on_progress)
    async with httpx.AsyncClient() as own_client:
        return await _poll(own_client, url, timeout, wait, headers, max_retry_after, on_progress)


def _accepting_json(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`headers` whose `Accept` also names JSON (`_JSON_TOO`), after what it names."""
    merged = dict(headers or {})
    name = next((name for name in merged if name.lower() == "accept"), "accept")
    merged[name] = f"{merged.get(name) or '*/*'}, {_JSON_TOO}"
    return merged


def _traced(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`headers` with the current span's `traceparent`, taken once for every poll."""
    if headers is not None and any(name.lower() == "traceparent" for name in headers):
        return headers
    try:
        from opentelemetry.propagate import inject
    except ImportError:  # no OpenTelemetry: nothing to carry
        return headers
    carrier = dict(headers or {})
    inject(carrier)  # adds nothing outside a span
    return carrier if "traceparent" in carrier else headers


async def _poll(
    client: httpx.AsyncClient,
    url: str,
    budget: float,
    wait: float | None,
    headers: Mapping[str, str] | None,
    max_retry_after: float,
    on_progress: ProgressCallback | None,
) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    attempts = 0
    last: httpx.Response | None = None
    while (remaining := deadline - loop.time()) > 0:
        attempts += 1
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                response = await client.get(
                    url,
                    headers=_request_headers(headers, wait, remaining),
                    timeout=_read_timeout(client, wait),
                )
        except TimeoutError:
            if scope.expired():
                break  # the overall deadline (httpx's own timeouts are httpx.TimeoutException)
            raise
        if response.status_code != 202:
            return response
        last = response
        if on_progress is not None and (state := JobProgress.from_response(response)):
            told = on_progress(state)
            if inspect.isawaitable(told):
                await told
        pause = retry_delay(response.headers.get("retry-after"), max_retry_after=max_retry_after)
        left = deadline - loop.time()
        if pause >= left:  # the next request would come too late: wait out the time, stop
            await asyncio.sleep(max(0.0, left))
            break
        await asyncio.sleep(pause)
    raise PendingTimeout(url, attempts=attempts, timeout=budget, last_response=last)


def _request_headers(
    headers: Mapping[str, str] | None, wait: float | None, remaining: float
) -> dict[str, str]:
    """The caller's headers plus `Prefer: wait=N`, N whole seconds less than the time left."""
    merged = {name.lower(): value for name, value in (headers or {}).items()}
    # The server may hold the request N seconds: its answer must come before the deadline.
    seconds = 0 if wait is None else min(math.floor(wait), math.ceil(remaining) - 1)
    if seconds >= 1:
        preference = f"wait={seconds}"
        merged["prefer"] = f"{merged['prefer']}, {preference}" if "prefer" in merged else preference
    return merged


def _read_timeout(client: httpx.AsyncClient, wait: float | None) -> httpx.Timeout:
    """The client's timeouts, with a read timeout long enough for the server to hold `wait`."""
    import httpx

    current = client.timeout
    if wait is None or current.read is None:
        return current
    read = max(current.read, wait + _READ_MARGIN)
    return httpx.Timeout(connect=current.connect, read=read, write=current.write, pool=current.pool)
