"""Waiting out a Redis the worker cannot reach, or that refuses what it asks.

`Patience`: how the worker waits for Redis, at start and when it is lost while running
(or answers, but refuses what the worker asks: a Redis over its `maxmemory` with
`noeviction`): one line when it goes, one every `report_every` seconds while it stays
away, one when it is back; between them, tries with a growing delay (up to `max_delay`),
for as long as it takes. `check_master` is the probe that tells a master from a replica
left behind by a failover.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from asgi_worker.backends.redis.retries import REDIS_ERRORS

logger = logging.getLogger("asgi_worker")


class RedisUnreachable(RedisConnectionError):
    """The worker could not reach Redis at start (and was not told to wait for it)."""


class NotMasterError(ReadOnlyError):
    """The Redis the worker reached answers, but is a read-only replica."""


async def check_master(client: Redis) -> None:
    """Raise unless `client` reaches a Redis that takes writes (a master).

    `ROLE` says so in one round trip; where it is not allowed (ACLs, renamed commands)
    a `PING` is all that is checked.
    """
    try:
        role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
    except ResponseError:
        await client.ping()
        return
    kind = role[0] if isinstance(role, list | tuple) and role else role
    if isinstance(kind, bytes):
        kind = kind.decode("ascii", "replace")
    if kind != "master":
        raise NotMasterError(f"it is a read-only {kind}, not the master")


@dataclass(frozen=True, slots=True)
class _Words:
    """What `Patience` logs as Redis goes, while it stays away, and as it is back."""

    gone: str
    still: str
    back: str


_LOST = _Words(
    "asgi-worker: lost Redis at %s: %r; retrying until it is back, for as long as it takes",
    "asgi-worker: Redis at %s still down after %.0f s: %r",
    "asgi-worker: Redis at %s is back after %.1f s",
)
_REFUSED = _Words(
    "asgi-worker: Redis at %s refuses the worker's commands: %r; trying again until it "
    "takes them, for as long as it takes",
    "asgi-worker: Redis at %s still refuses the worker's commands after %.0f s: %r",
    "asgi-worker: Redis at %s takes the worker's commands again after %.1f s",
)
_FULL = (
    " (it is over its maxmemory, and with maxmemory-policy noeviction it refuses writes "
    "until memory is freed)"
)


class Patience:
    """How the worker waits for Redis: tries with a growing delay, a line per change.

    `where` names what is waited for in the log (a URL, its password masked).
    """

    def __init__(
        self,
        where: str,
        *,
        report_every: float = 10.0,
        first_delay: float = 0.1,
        max_delay: float = 2.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self.where = where
        self.report_every = report_every
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.probe_timeout = probe_timeout

    async def probe(self, check: Callable[[], Awaitable[None]]) -> BaseException | None:
        """Run `check` once, within `probe_timeout`; the error it met, or None."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                await check()
        except REDIS_ERRORS as error:
            return error
        return None

    async def wait(
        self,
        check: Callable[[], Awaitable[None]],
        error: BaseException,
        *,
        starting: bool,
        refused: bool = False,
    ) -> None:
        """Log that Redis is away (`error`), then retry `check` until it passes.

        `refused`: Redis answers, but refuses what the worker asks (`check` is then the
        worker's own work), and the lines say so.
        """
        words = _REFUSED if refused else _LOST
        if starting:
            logger.error(
                "asgi-worker: cannot reach Redis at %s: %r; waiting for it (--wait-for-redis)",
                self.where,
                error,
            )
        else:
            full = _FULL if isinstance(error, OutOfMemoryError) else ""
            logger.error(words.gone + full, self.where, error)
        started = time.monotonic()
        next_report = started + self.report_every
        delay = self.first_delay
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_delay)
            failed = await self.probe(check)
            now = time.monotonic()
            if failed is None:
                logger.warning(words.back, self.where, now - started)
                return
            if now >= next_report:
                logger.warning(words.still, self.where, now - started, failed)
                next_report += self.report_every
