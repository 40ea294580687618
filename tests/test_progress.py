"""A job's progress: `report_progress` in the handler, the JSON `202`, bounded writes.

Each backend in turn (memory://, the inline worker, arq with a real worker in this loop):
a handler reports while a client polls with `Accept: application/json`.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_worker import (
    Config,
    WorkerMiddleware,
    report_progress,
    report_progress_sync,
)
from asgi_worker.client import JobProgress, fetch
from asgi_worker.core.keys import RedisKeys
from asgi_worker.core.progress import WRITE_EVERY, Progress, checked
from asgi_worker.testing import find_middleware
from asgi_worker.web.job_state import accepts_json
from asgi_worker.worker import settings

from .helpers import backend_config, serve
from .processes import free_port, processes
from .test_docs import docs_example

JSON = {"accept": "application/json"}


@dataclass
class Steps:
    """The test's hand on the slow handler: it moves a step each time `go` is set."""

    go: asyncio.Event = field(default_factory=asyncio.Event)
    reported: int = 0


def progress_app(config: Config, steps: Steps) -> Starlette:
    async def slow(request: Request) -> PlainTextResponse:
        for done in range(1, 4):
            await steps.go.wait()
            steps.go.clear()
            await report_progress(done, 4, f"step {done} of 4")
            steps.reported += 1
        await steps.go.wait()  # the test has seen the last step: answer
        return PlainTextResponse("done")

    async def chatty(request: Request) -> PlainTextResponse:
        # A tight loop of reports: the writes that reach the queue are bounded, not these.
        for done in range(2000):
            await report_progress(done, 2000)
            if done % 100 == 0:
                await asyncio.sleep(0.02)
        return PlainTextResponse("chatty")

    def sync_view(request: Request) -> PlainTextResponse:
        # A sync endpoint: Starlette runs it in a thread, with the replay's context.
        report_progress_sync(0.5, message="half way, from a thread")
        time.sleep(0.6)
        return PlainTextResponse("sync")

    async def direct(request: Request) -> PlainTextResponse:
        await report_progress(1, 2, "nobody listens")  # served directly: does nothing
        report_progress_sync(1, 2)
        return PlainTextResponse("direct")

    app = Starlette(
        routes=[
            Route("/slow", slow),
            Route("/chatty", chatty),
            Route("/sync", sync_view),
            Route("/direct", direct),
        ]
    )
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@pytest.fixture
def site(kind: str, config: Config) -> tuple[Starlette, Steps, Config]:
    steps = Steps()
    moved = backend_config(kind, config, fair_queueing=True)
    return progress_app(moved, steps), steps, moved


async def test_a_json_client_sees_the_job_move(
    site: tuple[Starlette, Steps, Config], kind: str
) -> None:
    app, steps, config = site
    worker = config if kind == "arq" else None
    async with serve(app, worker=worker) as http:
        first = await http.get("/slow", headers=JSON)
        assert first.status_code == 202
        assert first.headers["content-type"] == "application/json"
        assert first.headers["cache-control"] == "no-store"
        assert int(first.headers["retry-after"]) >= 1
        state = first.json()
        assert set(state) == {"status", "progress", "message", "position", "eta_seconds"}
        assert state["status"] in ("queued", "running")
        seen = []
        for step in range(1, 4):
            steps.go.set()
            expected = step / 4
            deadline = time.monotonic() + 5
            while True:
                answer = await http.get("/slow", headers=JSON)
                if answer.status_code == 200:
                    break
                state = answer.json()
                if state["progress"] == expected:
                    break
                assert time.monotonic() < deadline, f"progress stuck at {state}"
                await asyncio.sleep(0.05)
            if answer.status_code == 200:
                break
            assert state["status"] == "running"
            assert state["message"] == f"step {step} of 4"
            seen.append(state["progress"])
        assert seen == [0.25, 0.5, 0.75]
        steps.go.set()
        deadline = time.monotonic() + 10
        while (answer := await http.get("/slow", headers=JSON)).status_code == 202:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert answer.status_code == 200
        assert answer.text == "done"  # the app's answer, not a state


async def wait_for_200(http: httpx.AsyncClient, path: str, within: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + within
    while (answer := await http.get(path, headers=JSON)).status_code == 202:
        assert time.monotonic() < deadline, answer.json()
        await asyncio.sleep(0.05)
    return answer


async def state_when(
    http: httpx.AsyncClient, path: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first JSON 202 state of `path` that is `ready` (within 5 s)."""
    deadline = time.monotonic() + 5
    while not ready(state := (await http.get(path, headers=JSON)).json()):
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.02)
    return state


async def test_a_sync_view_reports_from_its_thread(
    site: tuple[Starlette, Steps, Config], kind: str
) -> None:
    app, _, config = site
    async with serve(app, worker=config if kind == "arq" else None) as http:
        await http.get("/sync")
        state = await state_when(http, "/sync", lambda state: state["progress"] == 0.5)
        assert state == {
            "status": "running",
            "progress": 0.5,
            "message": "half way, from a thread",
            "position": None,
            "eta_seconds": None,  # no job of the path has been timed yet
        }
        assert (await wait_for_200(http, "/sync")).text == "sync"


async def test_writes_are_bounded_however_often_the_handler_reports(
    site: tuple[Starlette, Steps, Config], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _, config = site
    writes: list[Progress] = []
    if kind == "arq":  # the worker writes through its own pool
        write = settings.write_progress

        async def counted_write(*args: Any, **kwargs: Any) -> None:
            writes.append(args[2])
            await write(*args, **kwargs)

        monkeypatch.setattr(settings, "write_progress", counted_write)
    async with serve(app, worker=config if kind == "arq" else None) as http:
        if kind != "arq":  # the in-process queue keeps it
            queue = find_middleware(app)._open().queue  # type: ignore[union-attr]
            report = queue.report

            async def counted(job_id: str, progress: Progress, *, ended: bool = False) -> None:
                writes.append(progress)
                await report(job_id, progress, ended=ended)

            queue.report = counted  # type: ignore[method-assign]
        began = time.monotonic()
        await http.get("/chatty")
        assert (await wait_for_200(http, "/chatty")).text == "chatty"
        took = time.monotonic() - began
    # One per WRITE_EVERY at most (the first at once), and the last as the job ends.
    assert 2 <= len(writes) <= took / WRITE_EVERY + 2, (len(writes), took)
    assert writes[-1].done == 1999  # the last value is the one kept


async def test_the_progress_key_outlives_its_job_briefly(config: Config, redis: Redis) -> None:
    steps = Steps()
    app = progress_app(config, steps)
    async with serve(app, worker=config) as http:
        await http.get("/slow")
        steps.go.set()
        pattern = RedisKeys(config.prefix).progress("*")
        deadline = time.monotonic() + 5
        while not (keys := [k async for k in redis.scan_iter(match=pattern)]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        [key] = keys
        assert 0 < await redis.pttl(key) <= round((config.job_timeout + 5) * 1000)
        for _ in range(3):
            await asyncio.sleep(0.1)
            steps.go.set()
        assert (await wait_for_200(http, "/slow")).text == "done"
        assert 0 < await redis.pttl(key) <= 5000  # KEEP_AFTER_END, then gone


async def test_a_state_that_cannot_be_read_leaves_a_202_of_nulls(config: Config) -> None:
    steps = Steps()
    app = progress_app(config, steps)
    async with serve(app) as http:
        queue = find_middleware(app)._open().queue  # type: ignore[union-attr]

        async def broken(job_id: str) -> None:
            raise ConnectionError("the queue's Redis went away")

        queue.state = broken  # type: ignore[method-assign]
        answer = await http.get("/slow", headers=JSON)
        assert answer.status_code == 202
        assert answer.json() == {
            "status": "queued",
            "progress": None,
            "message": None,
            "position": None,
            "eta_seconds": None,
        }


async def test_other_clients_get_the_empty_202(site: tuple[Starlette, Steps, Config]) -> None:
    app, steps, _ = site
    async with serve(app) as http:
        for accept in ("*/*", "text/html,application/xhtml+xml,*/*;q=0.8", "application/json;q=0"):
            answer = await http.get("/slow", headers={"accept": accept})
            assert answer.status_code == 202
            assert answer.content == b""
            assert "content-type" not in answer.headers
        steps.go.set()


async def test_served_directly_report_progress_does_nothing() -> None:
    app = Starlette(routes=[Route("/direct", _direct_only)])
    async with serve(app) as http:
        assert (await http.get("/direct")).text == "direct"


async def _direct_only(request: Request) -> PlainTextResponse:
    await report_progress(1, 2, "nobody listens")
    report_progress_sync(1, 2)
    return PlainTextResponse("direct")


def test_bad_progress_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="done must be a number"):
        checked("3", None, None, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total must be a finite number"):
        checked(1, float("nan"), None, 0.0)
    with pytest.raises(ValueError, match="done must be a finite number >= 0"):
        checked(-1, 2, None, 0.0)
    with pytest.raises(TypeError, match="message must be a str"):
        checked(1, 2, 3, 0.0)  # type: ignore[arg-type]
    long = checked(1, 2, "x" * 1000 + "\nnext", 0.0)
    assert long.message is not None
    assert len(long.message) == 200


def test_progress_fractions() -> None:
    assert Progress(3, 4).fraction == 0.75
    assert Progress(0.3).fraction == 0.3
    assert Progress(7, 4).fraction == 1.0  # more than all of it is all of it
    assert Progress(1, 0).fraction is None
    assert Progress(5).fraction == 1.0
    written = Progress(3, 4, "m", 12.5)
    assert Progress.from_fields({k.encode(): v.encode() for k, v in written.fields().items()}) == (
        written
    )
    assert Progress.from_fields({b"done": b"nope"}) is None
    assert Progress.from_fields({}) is None


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        ([b"application/json"], True),
        ([b"text/html, application/json;q=0.5"], True),
        ([b"APPLICATION/JSON"], True),
        ([b"application/json;q=0"], False),
        ([b"application/json;q=x"], False),
        ([b"*/*"], False),
        ([b"application/*"], False),
        ([], False),
    ],
)
def test_only_a_client_that_names_json_gets_it(accept: list[bytes], wanted: bool) -> None:
    assert accepts_json(accept) is wanted


@pytest.mark.parametrize("kind", ["memory", "arq"])  # inline's queue is memory://'s
async def test_a_queued_job_says_its_place_in_line(kind: str, config: Config) -> None:
    steps = Steps()
    # memory://: one slot, so the second and third jobs wait for it; arq: no worker yet.
    app = progress_app(backend_config(kind, config, max_jobs=1), steps)
    async with serve(app) as http:
        paths = [f"/slow?n={n}" for n in range(3)]
        for path in paths:
            assert (await http.get(path)).status_code == 202
        states = [(await http.get(path, headers=JSON)).json() for path in paths]
        if kind == "memory":  # the first holds the slot
            assert [s["status"] for s in states] == ["running", "queued", "queued"]
            assert [s["position"] for s in states] == [None, 0, 1]
        else:
            assert [s["status"] for s in states] == ["queued"] * 3
            assert [s["position"] for s in states] == [0, 1, 2]
        for _ in range(8):
            steps.go.set()
            await asyncio.sleep(0.02)


async def test_the_eta_comes_from_the_paths_typical_duration(
    site: tuple[Starlette, Steps, Config], kind: str
) -> None:
    app, _, config = site
    async with serve(app, worker=config if kind == "arq" else None) as http:
        await http.get("/sync?first")
        await wait_for_200(http, "/sync?first")  # the path's first job is timed: ~0.6 s
        await http.get("/sync?second")
        state = await state_when(http, "/sync?second", lambda state: state["progress"] is not None)
        # Half of the typical duration is left at half way.
        assert state["eta_seconds"] is not None, state
        assert 0.2 <= state["eta_seconds"] <= 0.6, state
        await wait_for_200(http, "/sync?second")


async def test_fetch_passes_each_state_to_on_progress(config: Config) -> None:
    steps = Steps()
    app = progress_app(backend_config("memory", config), steps)
    seen: list[JobProgress] = []

    async def step_on(progress: JobProgress) -> None:
        # The handler moves a step each time the client has seen the last one.
        if not seen or progress.progress != seen[-1].progress:
            steps.go.set()
        seen.append(progress)

    async with serve(app) as http:
        response = await fetch(
            "/slow", client=http, wait=None, max_retry_after=0.05, on_progress=step_on
        )
    assert response.text == "done"
    fractions = [p.progress for p in seen]
    assert {0.25, 0.5, 0.75} <= set(fractions), fractions
    assert fractions == sorted(fractions, key=lambda f: -1 if f is None else f)
    assert {p.status for p in seen} <= {"queued", "running"}


@pytest.mark.e2e
def test_the_docs_examples_show_a_real_jobs_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/progress.md: its handler under uvicorn, its client printing each state."""
    (tmp_path / "progress_app.py").write_text(docs_example("progress.md", "handler"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASGI_WORKER_")}
    server = [sys.executable, "-m", "uvicorn", "progress_app:app", "--port", str(port)]
    base_url = f"http://127.0.0.1:{port}"
    with processes(tmp_path, env) as group:
        group.start("uvicorn", server, cwd=tmp_path)
        group.wait_for("uvicorn", lambda: httpx.get(f"{base_url}/nothing").status_code == 404)
        namespace: dict[str, Any] = {"__name__": "docs_example"}
        exec(compile(docs_example("progress.md", "client"), "docs/progress.md", "exec"), namespace)
        asyncio.run(namespace["main"](base_url))
        lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "{'pages': 20}", lines
    running = [line for line in lines[:-1] if line.startswith("running ")]
    assert running, lines
    assert any(re.fullmatch(r"running \d+% reading page \d+ of 20", line) for line in running)
