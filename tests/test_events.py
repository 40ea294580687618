"""events.EventListener: one idle subscription that hears every event."""

from __future__ import annotations

import asyncio

from asgi_worker import Config
from asgi_worker.backends.redis.clients import redis_client, shared_source
from asgi_worker.backends.redis.events import EventListener

from .conftest import REDIS_URL


async def test_an_idle_subscription_stays_up_and_hears_every_event(prefix: str) -> None:
    # The web process's client (no read timeout) with a short redis_timeout: an idle
    # subscription must not time out, drop and miss what is published meanwhile.
    config = Config(redis_url=REDIS_URL, prefix=prefix, redis_timeout=0.2)
    client = redis_client(REDIS_URL, config, read_timeout=False)
    heard: list[str] = []
    channel = f"{prefix}:events"
    listener = EventListener(
        shared_source(client),
        channel,
        on_event=heard.append,
        on_resync=lambda: heard.append("resync"),
    )
    try:
        await listener.ready(1.0)
        assert listener.subscribed
        await asyncio.sleep(0.7)  # several redis_timeouts of silence
        await client.publish(channel, "first")
        await asyncio.sleep(0.3)
        await client.publish(channel, "second")
        await asyncio.sleep(0.1)
        assert heard == ["resync", "first", "second"]  # subscribed once, nothing missed
        assert listener.subscribed
    finally:
        await listener.close()
        await client.aclose(close_connection_pool=True)
