"""Real subprocesses for end-to-end tests: start, wait until ready, always stop, show logs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

PROJECT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 20.0
STOP_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def asgi_worker_command(*arguments: str) -> list[str]:
    """The installed `asgi-worker` script (or the same entry point through python -c)."""
    script = Path(sys.executable).parent / "asgi-worker"
    found = str(script) if script.exists() else shutil.which("asgi-worker")
    if found:
        return [found, *arguments]
    code = "import sys; from asgi_worker.cli.commands import main; sys.exit(main())"
    return [sys.executable, "-c", code, *arguments]


class Processes:
    """The processes of one test; their output goes to files in the test's tmp dir."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self._directory = directory
        self._env = env
        self._running: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self,
        name: str,
        command: list[str],
        cwd: Path = PROJECT,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `command`, its output in `<name>.log`; `env` replaces the group's."""
        handle = (self._directory / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=self._env if env is None else env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        self._running.append((name, process, handle))
        return process

    def logs(self) -> str:
        parts = []
        for name, _, _ in self._running:
            path = self._directory / f"{name}.log"
            parts.append(f"----- {name} ({path}) -----\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll `ready` until true; fail early if a process died, or after STARTUP_SECONDS."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            for _, process, _ in self._running:
                if process.poll() is not None:
                    pytest.fail(f"{process.args!r} exited with {process.returncode}\n{self.logs()}")
            try:
                if ready():
                    return
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.05)
        pytest.fail(f"{what} not ready after {STARTUP_SECONDS}s\n{self.logs()}")

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM each, then SIGKILL what has not exited in time; returns the exit codes."""
        codes = {name: stop(process) for name, process, _ in self._running}
        for _, _, handle in self._running:
            handle.close()
        return codes


def http_client(base_url: str, connections: int = 10) -> httpx.AsyncClient:
    """A client for a test server, its idle connections dropped before the server drops them.

    uvicorn closes a keep-alive connection after 5 s idle, httpx by default after 5 s too:
    a request sent on one at that moment meets a closed socket (`httpx.ReadError`).
    """
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=2.0
    )
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0)


def stop(process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)
    return process.returncode


@contextmanager
def processes(directory: Path, env: dict[str, str]) -> Iterator[Processes]:
    group = Processes(directory, env)
    try:
        yield group
    finally:
        codes = group.stop_all()
        # Printed always; pytest shows it only for a failing test.
        print(f"exit codes: {codes}\n{group.logs()}")


@contextmanager
def demo(directory: Path, seconds: float) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`asgi-worker demo --seconds N` on a free port, without ASGI_* from the environment."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    base = f"http://127.0.0.1:{port}"
    with processes(directory, env) as group:
        process = group.start(
            "demo", asgi_worker_command("demo", "--port", str(port), "--seconds", f"{seconds}")
        )
        group.wait_for("demo", lambda: httpx.get(f"{base}/", timeout=1).status_code == 200)
        yield base, process
