"""Single-flight: callers asking for the same key while one call is on its way share it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Result = TypeVar("Result")


class _Cancelled:
    """The shared call was cancelled (its caller went away): the others call themselves."""


_CANCELLED = _Cancelled()


class SingleFlight(Generic[Result]):
    """At most one call per key in flight; later callers await its result (or error).

    Costs a caller that finds nothing in flight two dict operations: the future that
    followers wait on is made only when the first follower arrives.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Result | _Cancelled] | None] = {}

    async def run(self, key: str, call: Callable[[], Awaitable[Result]]) -> Result:
        """`await call()`, or share the result of the same key's call already running."""
        if key in self._inflight:
            shared = self._inflight[key]
            if shared is None:
                shared = self._inflight[key] = asyncio.get_running_loop().create_future()
            result = await asyncio.shield(shared)
            if isinstance(result, _Cancelled):
                return await call()
            return result
        self._inflight[key] = None
        outcome: Result | _Cancelled = _CANCELLED
        try:
            outcome = await call()
            return outcome
        except Exception as error:
            shared = self._inflight.get(key)
            if shared is not None:
                shared.set_exception(error)
            raise
        finally:
            shared = self._inflight.pop(key, None)
            if shared is not None and not shared.done():
                shared.set_result(outcome)
