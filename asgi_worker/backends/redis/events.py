"""What the store announces, and the one listener per web process that hears it.

The commit script publishes each stored digest on `<prefix>:events`; the invalidation
scripts publish `INVALIDATED` (their digests are not listed one by one). Listeners: the
`Prefer: wait` registry (wake the requests waiting for a digest) and the near cache
(evict). While the listener is not subscribed, nobody may rely on it: `subscribed` says
so, and every (re)subscription calls `on_resync`, since messages may have been missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.exceptions import RedisError

from asgi_worker.backends.redis.clients import PubSubSource

logger = logging.getLogger("asgi_worker")

INVALIDATED = "!"
"""The message an invalidation publishes (a digest is 32 hex digits, never this)."""

_RECONNECT_DELAY = 1.0


class EventListener:
    """One pub/sub subscription to the store's events, started on first need.

    `source` opens the connection to subscribe on (`clients.shared_source`, or on a
    Cluster a `NodeSubscriber`, which moves to another node after a failure).
    """

    def __init__(
        self,
        source: PubSubSource,
        channel: str,
        *,
        on_event: Callable[[str], None],
        on_resync: Callable[[], None],
    ) -> None:
        self._source = source
        self._channel = channel
        self._on_event = on_event
        self._on_resync = on_resync
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def subscribed(self) -> bool:
        """True while every event reaches the callbacks."""
        return self._subscribed.is_set()

    def start(self) -> None:
        """Start listening in the background, if not yet."""
        if self._task is None or self._task.done():
            self._subscribed.clear()
            self._task = asyncio.create_task(self._listen(), name="asgi-worker events")

    async def ready(self, within: float) -> None:
        """Start listening; return once subscribed, or after `within` seconds."""
        self.start()
        assert self._task is not None
        if not self._subscribed.is_set():
            wait = asyncio.ensure_future(self._subscribed.wait())
            await asyncio.wait(
                {wait, self._task}, timeout=within, return_when=asyncio.FIRST_COMPLETED
            )
            wait.cancel()

    async def close(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._subscribed.clear()

    async def _listen(self) -> None:
        while True:
            try:
                async with (
                    self._source() as redis,
                    redis.pubsub(ignore_subscribe_messages=True) as pubsub,
                ):
                    await pubsub.subscribe(self._channel)
                    self._subscribed.set()
                    self._on_resync()  # anything published while we were away was missed
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self._on_event(data.decode("ascii", "replace"))
            except (RedisError, OSError) as error:
                self._subscribed.clear()
                self._on_resync()
                logger.warning("asgi-worker: event listener lost Redis: %r", error)
                await asyncio.sleep(_RECONNECT_DELAY)
