"""Developer sessions: `nox -s tests`, `lint`, `typing`, `docs`; `nox -s bench`."""

from __future__ import annotations

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
