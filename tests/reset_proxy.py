"""A TCP proxy in front of a Redis that resets, delays and stalls connections on cue.

Clients connect to the proxy as to Redis. What it can do to the link:

- `reset_on(marker, times)`: the next `times` connections that send bytes holding
  `marker` are reset (a TCP RST, what a client sees as "Connection reset by peer") as
  those bytes arrive; Redis never sees them.
- `stall_on(marker, times)`: the next `times` connections that send `marker` stall
  there: those bytes and everything after them, both ways, are held (the connection stays
  open, nothing moves, as on a link that drops every packet) until `thaw()`. A client
  that gives up and closes a stalled connection loses what was held: Redis never sees it.
  With `replies=True` the command reaches Redis and only what comes back is held: Redis
  ran it, the client never learns.
- `stall()`: every connection stalls, new ones too, until `thaw()`.
- `delay(up, down)`: every chunk takes `up` seconds to reach Redis and `down` seconds to
  come back (a slow link; bytes keep their order).

A marker is a key name or a script's SHA-1 that only the command to fault carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

# SO_LINGER on, with a timeout of 0: closing the socket sends RST, not FIN.
_RESET = struct.pack("ii", 1, 0)


class ResetProxy:
    """Forwards every connection to `port` on 127.0.0.1; faults the ones it is told to."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._marker = b""
        self._left = 0
        self._stall_marker = b""
        self._stall_left = 0
        self._stall_replies = False
        self._up = 0.0
        self._down = 0.0
        self._flowing = asyncio.Event()  # cleared by `stall()`: nothing moves anywhere
        self._flowing.set()
        self._links: set[_Link] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self.resets = 0
        """How many connections it has reset."""
        self.stalls = 0
        """How many connections `stall_on` has stalled."""
        self.stalled = asyncio.Event()
        """Set once `stall_on` has stalled a connection."""
        self.port = 0

    @property
    def url(self) -> str:
        """The proxy's Redis URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def reset_on(self, marker: bytes, times: int) -> None:
        """Reset the next `times` connections that send `marker` (0: none any more)."""
        self._marker = marker
        self._left = times

    def stall_on(self, marker: bytes, times: int, *, replies: bool = False) -> None:
        """Stall the next `times` connections that send `marker` (0: none any more).

        `replies`: let the command through, hold only what comes back.
        """
        self._stall_marker = marker
        self._stall_left = times
        self._stall_replies = replies

    def stall(self) -> None:
        """Stall every connection, and every new one, until `thaw()`."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Let every stalled connection go on: what was held is sent on now."""
        self._stall_left = 0
        self._flowing.set()
        for link in self._links:
            link.up.set()
            link.down.set()

    def delay(self, up: float, down: float) -> None:
        """Delay each chunk by `up` seconds on its way to Redis, `down` on its way back."""
        self._up, self._down = up, down

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (`port`, `url`)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        self.thaw()
        if self._server is not None:
            self._server.close()
        for writer in self._open:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self._target)
        link = _Link()
        self._links.add(link)
        self._open |= {to_client, to_server}
        up = asyncio.create_task(self._forward(client, to_server, link, link.up, to_client))
        down = asyncio.create_task(self._forward(server, to_client, link, link.down, None))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._links.discard(link)
            self._open -= {to_client, to_server}
            to_server.close()
            to_client.close()

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        flowing: asyncio.Event,
        client: asyncio.StreamWriter | None,
    ) -> None:
        """One direction of a link (`client` given: the way to Redis, where cues apply)."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send(held, writer, flowing))
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if client is not None and self._left > 0 and self._marker in data:
                        self._left -= 1
                        self.resets += 1
                        _reset(client)
                        return
                    if client is not None and self._stall_left > 0 and self._stall_marker in data:
                        self._stall_left -= 1
                        self.stalls += 1
                        self.stalled.set()
                        link.down.clear()
                        if not self._stall_replies:
                            link.up.clear()
                    delay = self._up if client is not None else self._down
                    held.put_nowait((loop.time() + delay, data))
            if link.stalled or not self._flowing.is_set():
                return  # the peer gave up on a stalled link: what it held is lost
            held.put_nowait(None)
            await sender  # the bytes still on their (delayed) way arrive, then the close
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    async def _send(
        self,
        held: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        flowing: asyncio.Event,
    ) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while (item := await held.get()) is not None:
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                await flowing.wait()
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()


class _Link:
    """One proxied connection's state."""

    def __init__(self) -> None:
        # Each way's bytes move while set; a `stall_on` cue clears them.
        self.up = asyncio.Event()
        self.down = asyncio.Event()
        self.up.set()
        self.down.set()

    @property
    def stalled(self) -> bool:
        return not (self.up.is_set() and self.down.is_set())


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    writer.transport.abort()


@contextlib.asynccontextmanager
async def reset_proxy(port: int) -> AsyncIterator[ResetProxy]:
    """A started `ResetProxy` to 127.0.0.1:`port`, closed on the way out."""
    proxy = ResetProxy(port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
