"""Load generation: `wrk` (Debian's package) when installed, else a small asyncio client.

Also a minimal HTTP/1.1 keep-alive client, used for exact-count workloads (N distinct
URLs), prewarming and the time-to-ready probe: the standard library only, no extra
per-request machinery between the numbers and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One bounded load run against one URL."""

    requests_per_second: float
    requests: int
    seconds: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: int
    """Socket errors, timeouts and non-2xx/3xx responses."""
    tool: str


def wrk_available() -> bool:
    """True if the `wrk` binary is on PATH."""
    return shutil.which("wrk") is not None


def run_load(
    url: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    headers: Sequence[str] = (),
) -> LoadResult:
    """Drive `url` for `seconds` with `connections` keep-alive connections.

    `headers` (`"Name: value"` lines) go with every request; only wrk sends them.
    """
    if wrk_available():
        return _run_wrk(
            url, seconds=seconds, connections=connections, threads=threads, headers=headers
        )
    if headers:
        raise RuntimeError("request headers need wrk: apt-get install -y wrk")
    return asyncio.run(_python_load(url, seconds=seconds, connections=connections))


# ------------------------------------------------------------------------- wrk

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _run_wrk(
    url: str, *, seconds: float, connections: int, threads: int, headers: Sequence[str] = ()
) -> LoadResult:
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "--latency",
        *(argument for header in headers for argument in ("-H", header)),
        url,
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 30)
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    assert done is not None, text
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", text, re.MULTILINE))
    errors = 0
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket:
        errors += sum(int(n) for n in socket.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    return LoadResult(
        requests_per_second=rps,
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        latency_p50_ms=_ms(latency["50"]) if "50" in latency else None,
        latency_p99_ms=_ms(latency["99"]) if "99" in latency else None,
        errors=errors,
        tool=f"wrk -t{threads} -c{connections}",
    )


# ------------------------------------------------------------- the asyncio client


class HttpConnection:
    """One HTTP/1.1 keep-alive connection; enough of the protocol for our own servers."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
        """GET `path`; returns status, headers (names lowercased; last value wins), body."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n\r\n".encode()
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding") == b"chunked":
            body = await self._read_chunked()
        else:
            body = await self._reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection") == b"close":
            await self.close()
        return status, headers, body

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts = []
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    async def close(self) -> None:
        """Close the connection (a later `get` reconnects)."""
        if self._writer is not None:
            writer, self._writer, self._reader = self._writer, None, None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _host_port(url: str) -> tuple[str, int, str]:
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)?", url)
    assert match is not None, url
    return match.group(1), int(match.group(2)), match.group(3) or "/"


@dataclass
class StatusCounts:
    """How many responses of each status an exact-count workload got."""

    counts: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, status: int) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1


async def get_many(base_url: str, paths: Iterable[str], *, connections: int = 32) -> StatusCounts:
    """GET every path once, over `connections` keep-alive connections; count statuses."""
    host, port, _ = _host_port(base_url)
    pending = iter(paths)
    result = StatusCounts()

    async def client() -> None:
        conn = HttpConnection(host, port)
        try:
            for path in pending:  # shared iterator: each path is taken by one client
                status, _, _ = await conn.get(path)
                result.add(status)
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    result.seconds = time.perf_counter() - started
    return result


async def _python_load(url: str, *, seconds: float, connections: int) -> LoadResult:
    host, port, path = _host_port(url)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        conn = HttpConnection(host, port)
        try:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    status, _, _ = await conn.get(path)
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    await conn.close()
                    continue
                latencies.append(time.perf_counter() - sent)
                if status >= 400:
                    errors += 1
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float | None:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
            if latencies
            else None
        )

    return LoadResult(
        requests_per_second=len(latencies) / elapsed,
        requests=len(latencies),
        seconds=elapsed,
        latency_p50_ms=pct(0.50),
        latency_p99_ms=pct(0.99),
        errors=errors,
        tool=f"python asyncio client -c{connections}",
    )
