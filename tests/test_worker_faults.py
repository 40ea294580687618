"""A worker dies or is stopped in the middle of a job: uvicorn and `asgi-worker worker`
as real subprocesses (tests/stack.py), with a short job timeout and claim lease.

`/hang?seconds=S` counts its run in Redis on entry, so a test knows the job is *inside*
the endpoint before it kills or stops the worker, and how often the endpoint ran.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .stack import Stack, get_until_ready, running_stack, wait_until

pytestmark = pytest.mark.e2e

JOB_TIMEOUT = 3.0
HANG = 2.0  # how long the endpoint takes: inside job_timeout


def inside(stack: Stack, path: str, runs: int) -> None:
    """Wait until the endpoint at `path` has been entered `runs` times."""
    wait_until(f"{path} entered {runs}x", lambda: stack.runs(path) >= runs, within=10, stack=stack)


@pytest.fixture
def short_lease(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(prefix, tmp_path, job_timeout=str(JOB_TIMEOUT), claim_ttl="4") as stack:
        yield stack


async def test_worker_killed_inside_the_endpoint_is_redone_after_the_lease(
    short_lease: Stack,
) -> None:
    stack, claim_ttl = short_lease, 4.0
    url = f"/hang?seconds={HANG}&case=kill"
    async with stack.client() as http:
        assert (await http.get(url)).status_code == 202
        inside(stack, "/hang", 1)
        killed = stack.worker
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=5) == -signal.SIGKILL
        killed_at = time.monotonic()

        # Its claim still holds: 202s, and no second job yet.
        assert (await http.get(url)).status_code == 202
        fresh = stack.start_worker()
        # The lease runs out, the next GET claims and enqueues, the fresh worker runs it.
        served = await get_until_ready(http, url, within=claim_ttl + HANG + 4, interval=0.1)
        elapsed = time.monotonic() - killed_at
    assert served.status_code == 200, stack.logs()
    assert served.json() == {"url": url, "pid": fresh.pid, "run": 2}
    assert elapsed < claim_ttl + HANG + 4
    await asyncio.sleep(0.5)  # the dead worker's job must not come back for a third run
    assert stack.runs("/hang") == 2
    assert stack.runs_by_url() == {url: 2}


@pytest.fixture
def long_lease(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    # A lease far longer than the endpoint: being served before it runs out proves the
    # URL did not wait for it.
    with running_stack(prefix, tmp_path, job_timeout=str(JOB_TIMEOUT), claim_ttl="10") as stack:
        yield stack


async def test_sigterm_inside_the_endpoint_finishes_the_job_and_exits_0(
    long_lease: Stack,
) -> None:
    stack, claim_ttl = long_lease, 10.0
    url = f"/hang?seconds={HANG}&case=term"
    async with stack.client() as http:
        assert (await http.get(url)).status_code == 202
        inside(stack, "/hang", 1)
        worker = stack.worker
        worker.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        served = await get_until_ready(http, url, within=claim_ttl, interval=0.05)
        elapsed = time.monotonic() - stopped_at
    assert served.status_code == 200, stack.logs()
    # Finished by the stopping worker itself: one run, well before the lease ran out.
    assert served.json() == {"url": url, "pid": worker.pid, "run": 1}
    assert elapsed < HANG + 2 < claim_ttl
    assert worker.wait(timeout=15) == 0, stack.logs()
    assert stack.runs("/hang") == 1


@pytest.fixture
def one_job_at_a_time(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(
        prefix, tmp_path, job_timeout=str(JOB_TIMEOUT), claim_ttl="10", max_jobs="1"
    ) as stack:
        yield stack


async def test_sigterm_leaves_queued_jobs_to_the_next_worker(one_job_at_a_time: Stack) -> None:
    stack, claim_ttl = one_job_at_a_time, 10.0
    running = f"/hang?seconds={HANG}&case=running"
    waiting = "/hang?seconds=0&case=waiting"
    async with stack.client() as http:
        assert (await http.get(running)).status_code == 202
        inside(stack, "/hang", 1)
        queued_at = time.monotonic()
        assert (await http.get(waiting)).status_code == 202  # queued: max_jobs=1 is busy
        assert stack.queued() >= 1
        first = stack.worker
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0, stack.logs()
        # It finished what it had started, and took nothing new.
        assert stack.runs_by_url() == {running: 1}
        done = await http.get(running)
        assert done.json() == {"url": running, "pid": first.pid, "run": 1}

        second = stack.start_worker()
        served = await get_until_ready(http, waiting, within=claim_ttl, interval=0.05)
        elapsed = time.monotonic() - queued_at
    assert served.status_code == 200
    assert served.json() == {"url": waiting, "pid": second.pid, "run": 2}
    assert elapsed < claim_ttl  # the queued job itself ran: no lease had to run out
    assert stack.runs_by_url() == {running: 1, waiting: 1}
