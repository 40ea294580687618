"""A TCP proxy in front of a Redis that resets connections on cue, for connection faults.

Clients connect to the proxy as to Redis. `reset_on(marker, times)` arms it: the next
`times` connections that send bytes holding `marker` are reset (a TCP RST, what a client
sees as "Connection reset by peer") as those bytes arrive; Redis never sees them. A
marker is a key name or a script's SHA-1 that only the command to fault carries.
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
    """Forwards every connection to `port` on 127.0.0.1; resets the ones it is told to."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._marker = b""
        self._left = 0
        self._open: set[asyncio.StreamWriter] = set()
        self.resets = 0
        """How many connections it has reset."""
        self.port = 0

    @property
    def url(self) -> str:
        """The proxy's Redis URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def reset_on(self, marker: bytes, times: int) -> None:
        """Reset the next `times` connections that send `marker` (0: none any more)."""
        self._marker = marker
        self._left = times

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 (`port`, `url`)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._open:
            writer.close()

    async def _serve(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self._target)
        back = asyncio.create_task(_pipe(server, to_client))
        self._open |= {to_client, to_server}
        try:
            while data := await client.read(65536):
                if self._left > 0 and self._marker in data:
                    self._left -= 1
                    self.resets += 1
                    _reset(to_client)
                    return
                to_server.write(data)
                await to_server.drain()
        except OSError:
            pass
        finally:
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await back
            self._open -= {to_client, to_server}
            to_server.close()
            to_client.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


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
