"""Real processes for the benchmark: uvicorn servers and `asgi-worker worker`.

Each process writes its output to a log file in the run's directory; every process is
stopped (SIGTERM, then SIGKILL) when its context ends, whatever happened.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_SECONDS = 30.0
STOP_SECONDS = 10.0


def free_port() -> int:
    """A TCP port on the loopback interface nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time `pid` has used so far (None if /proc does not show it)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After "pid (comm)": state is field 3, utime field 14, stime field 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent not idle since boot (/proc/stat), in seconds."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (wrk runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited in time; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_SECONDS)
    return process.returncode


@dataclass
class Server:
    """One uvicorn process serving one app."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return self.base_url + path


def uvicorn_command(app_spec: str, port: int) -> list[str]:
    """uvicorn with uvloop and httptools, one process, no access log, on loopback."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app_spec,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--lifespan",
        "on",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def asgi_worker_command(*arguments: str) -> list[str]:
    """The installed `asgi-worker` script (or its entry point through `python -c`)."""
    script = Path(sys.executable).parent / "asgi-worker"
    found = str(script) if script.exists() else shutil.which("asgi-worker")
    if found:
        return [found, *arguments]
    code = "import sys; from asgi_worker.cli.commands import main; sys.exit(main())"
    return [sys.executable, "-c", code, *arguments]


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited early:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {READY_SECONDS}s:\n{log.read_text()}")


@contextmanager
def serve(
    name: str, app_spec: str, env: dict[str, str], logs: Path, probe: str = "/health"
) -> Iterator[Server]:
    """Run `app_spec` under uvicorn until the block ends."""
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            uvicorn_command(app_spec, port),
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, f"http://127.0.0.1:{port}{probe}", log)
        yield Server(name, port, process, log)
    finally:
        stop(process)


@contextmanager
def worker(
    env: dict[str, str], logs: Path, name: str = "worker"
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `asgi-worker worker benchmarks.apps:asgi_worker_app` until the block ends."""
    log = logs / f"{name}.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            asgi_worker_command("worker", "benchmarks.apps:asgi_worker_app"),
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        stop(process)


def run_burst_worker(env: dict[str, str], logs: Path, name: str = "burst-worker") -> float:
    """Run `asgi-worker worker ... --burst` to completion; returns its wall time."""
    log = logs / f"{name}.log"
    started = time.perf_counter()
    with log.open("ab") as handle:
        subprocess.run(
            asgi_worker_command("worker", "benchmarks.apps:asgi_worker_app", "--burst"),
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=600,
        )
    return time.perf_counter() - started


def process_env(**extra: str) -> dict[str, str]:
    """This environment, minus any ASGI_WORKER_* of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_WORKER_")}
    env.update(extra)
    return env
