"""`Prefer: wait=N` (RFC 7240): hold a miss briefly instead of making the client poll.

A commit announces the digest it stored (events.py); each web process keeps one shared
listener and this registry of waiting requests, so N waiters on one URL cost one
subscription and one message, not N polling loops. The registry is bounded: past
`max_waiters` a request gets the usual 202 at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from starlette.types import Receive


@dataclass(frozen=True, slots=True)
class Preference:
    """What a request's `Prefer` header asks of us."""

    wait: float | None = None
    """Seconds the client is willing to wait for the response."""
    respond_async: bool = False


def parse_prefer(values: list[bytes]) -> Preference:
    """Read `Prefer` header values (RFC 7240); unknown or malformed preferences are ignored."""
    wait: float | None = None
    respond_async = False
    for value in values:
        for item in value.decode("latin-1").split(","):
            name, _, argument = item.split(";", 1)[0].strip().partition("=")
            name = name.strip().lower()
            argument = argument.strip().strip('"')
            if name == "respond-async":
                respond_async = True
            elif name == "wait" and argument.isascii() and argument.isdigit() and wait is None:
                wait = float(min(int(argument), 2**31))
    return Preference(wait=wait, respond_async=respond_async)


class Waiters:
    """Requests of this process waiting for digests to be stored."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._count = 0

    @property
    def count(self) -> int:
        """Requests waiting now."""
        return self._count

    def register(self, digest: str) -> asyncio.Future[None] | None:
        """A future that `wake(digest)` completes; None if the process is at its limit."""
        if self._count >= self._limit:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(digest, set()).add(future)
        self._count += 1
        return future

    def unregister(self, digest: str, future: asyncio.Future[None]) -> None:
        """Forget a waiter (woken, timed out, or its client went away)."""
        waiting = self._waiting.get(digest)
        if waiting is not None and future in waiting:
            waiting.discard(future)
            self._count -= 1
            if not waiting:
                del self._waiting[digest]

    def wake(self, digest: str) -> None:
        """Everything waiting for `digest` may look again."""
        for future in self._waiting.get(digest, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        """Let every waiter look again (e.g. notifications may have been missed)."""
        for digest in list(self._waiting):
            self.wake(digest)


class Gone:
    """The client disconnected while its request was held."""


Found = TypeVar("Found")


async def hold(
    waiters: Waiters,
    digest: str,
    look: Callable[[], Awaitable[Found | None]],
    until: float,
    receive: Receive,
) -> Found | Gone | None:
    """Look until `look()` finds something, `until` (the loop's time), or the client goes.

    Sleeps between looks until `waiters.wake(digest)`; registers before each look, so a
    commit landing between the look and the sleep still wakes it. None: not found in
    time (or this process already holds its limit of waiters). No look begins after
    `until`; one begun before it takes as long as `look` lets it.
    """
    loop = asyncio.get_running_loop()
    deadline = until
    disconnected = asyncio.ensure_future(_disconnect(receive))
    try:
        while True:
            woken = waiters.register(digest)
            if woken is None:
                return None
            try:
                found = await look()
                remaining = deadline - loop.time()
                if found is not None or remaining <= 0:
                    return found
                await asyncio.wait(
                    {woken, disconnected}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                if disconnected.done():
                    return Gone()
            finally:
                waiters.unregister(digest, woken)
    finally:
        disconnected.cancel()


async def _disconnect(receive: Receive) -> None:
    """Return when the client goes away (a GET has no body to read first)."""
    while (await receive())["type"] != "http.disconnect":
        pass
