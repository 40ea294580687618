"""The worker and a Redis that goes away: it never dies of it (docs/sentinel.md and
docs/failure-modes.md).

- Running: Redis stopped for 30 s (arq's own poll loop gave up after about 25 s of
  retries) under `asgi-worker worker`; once Redis is back, the same worker process serves
  again, and its log says lost / still down / back, one line per change.
- Starting: Redis unreachable is one clear line within a few seconds, then exit 69; or,
  with `--wait-for-redis`, a wait that ends when Redis comes.
- Frozen (it accepts, never answers): an outage too, once a poll iteration is stuck.
- A Redis error while arq takes a job must not cost the worker one of its `max_jobs`
  slots for good (arq 0.28 keeps it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from asgi_worker import Config
from asgi_worker.worker.arq_worker import ReplayWorker
from asgi_worker.worker.settings import worker_settings

from .helpers import build_app, make_config, serve
from .own_redis import OwnRedis, own_redis
from .processes import PROJECT, asgi_worker_command, free_port
from .stack import APP, get_until_ready, running_stack

OUTAGE_SECONDS = 30.0
START_SECONDS = 5.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[OwnRedis]:
    with own_redis(tmp_path) as own:
        yield own


@pytest.mark.e2e
async def test_worker_waits_out_a_30_s_outage_and_serves_again(
    prefix: str, server: OwnRedis, tmp_path: Path
) -> None:
    with running_stack(prefix, tmp_path, redis_url=server.url) as stack:
        worker = stack.worker
        async with stack.client() as http:
            assert (await http.get("/hang?n=1")).status_code == 202
            before = await get_until_ready(http, "/hang?n=1", within=10)
            assert before.status_code == 200

            server.stop()
            stopped = time.monotonic()
            while time.monotonic() - stopped < OUTAGE_SECONDS:
                assert worker.poll() is None, f"the worker died\n{stack.logs()}"
                await asyncio.sleep(0.5)
            server.start()  # empty: no queue, no entries, no scripts
            back = time.monotonic()

            for _ in range(50):  # the web side answers again at once
                if (await http.get("/hang?n=2")).status_code == 202:
                    break
                await asyncio.sleep(0.1)
            after = await get_until_ready(http, "/hang?n=2", within=10)
            served_in = time.monotonic() - back
        assert worker.poll() is None, f"the worker exited with {worker.returncode}"
        log = (tmp_path / "worker1.log").read_text(errors="replace")
    assert after.status_code == 200, stack.logs()
    assert after.json()["pid"] == worker.pid
    lost = [line for line in log.splitlines() if "asgi-worker: lost Redis at" in line]
    still = [line for line in log.splitlines() if "still down after" in line]
    found = [line for line in log.splitlines() if "is back after" in line]
    print(
        f"[outage] served {served_in:.2f} s after Redis came back\n"
        + "\n".join(lost + still + found)
    )
    assert len(lost) == 1, log
    assert server.url in lost[0]
    assert len(still) == 2, log  # after 10 s and 20 s, then back before 30 s would show
    assert len(found) == 1, log
    assert float(found[0].split("is back after ")[1].split(" s")[0]) >= OUTAGE_SECONDS - 3


def _worker_environment(redis_url: str, prefix: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_")}
    env.update(ASGI_WORKER_REDIS_URL=redis_url, ASGI_WORKER_PREFIX=prefix, PYTHONUNBUFFERED="1")
    return env


def _start_worker(
    redis_url: str, prefix: str, log: Path, *arguments: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        asgi_worker_command("worker", APP, *arguments),
        cwd=PROJECT,
        env=_worker_environment(redis_url, prefix),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


@pytest.mark.e2e
def test_worker_start_without_redis_is_one_clear_line_then_exit_69(
    prefix: str, tmp_path: Path
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    log = tmp_path / "worker.log"
    started = time.monotonic()
    process = _start_worker(url, prefix, log)
    try:
        code = process.wait(timeout=30)
    finally:
        _stop(process)
    took = time.monotonic() - started
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    print(f"[start-up] exit {code} after {took:.2f} s (with the interpreter's start): {lines}")
    assert code == 69
    assert len(lines) == 1, lines
    shown = url.replace("s3cret", "***")
    assert f"asgi-worker: cannot reach Redis at {shown}: ConnectionError(" in lines[0]
    assert "s3cret" not in lines[0]
    assert took < START_SECONDS + 5  # the import of the app and arq is in it too


@pytest.mark.e2e
def test_worker_started_against_a_replica_says_so_and_exits_69(
    prefix: str, server: OwnRedis, tmp_path: Path
) -> None:
    # A URL that names a replica (say, a master a failover demoted): it answers, but a
    # worker could take no job from it. Its master is nowhere: it stays read-only.
    with server.client() as client:
        client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    log = tmp_path / "worker.log"
    process = _start_worker(server.url, prefix, log)
    try:
        code = process.wait(timeout=30)
    finally:
        _stop(process)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert code == 69
    assert len(lines) == 1, lines
    assert f"cannot reach Redis at {server.url}: NotMasterError(" in lines[0]
    assert "it is a read-only slave, not the master" in lines[0]


@pytest.mark.e2e
def test_worker_start_with_wait_for_redis_waits_then_takes_jobs(
    prefix: str, tmp_path: Path
) -> None:
    server = OwnRedis(tmp_path, port=free_port())  # not started yet
    log = tmp_path / "worker.log"
    process = _start_worker(server.url, prefix, log, "--wait-for-redis")
    try:
        time.sleep(START_SECONDS)
        assert process.poll() is None, log.read_text()
        waiting = log.read_text()
        server.start()
        with server.client() as client:
            deadline = time.monotonic() + 15
            while not client.exists(f"{prefix}:queue:health-check"):  # polling the queue
                assert time.monotonic() < deadline, log.read_text()
                assert process.poll() is None, log.read_text()
                time.sleep(0.05)
        code = _stop(process)
    finally:
        _stop(process)
        server.stop()
    text = log.read_text()
    assert f"asgi-worker: cannot reach Redis at {server.url}: ConnectionError(" in waiting
    assert "waiting for it (--wait-for-redis)" in waiting
    assert "is back after" in text
    assert code == 0, text


async def test_a_redis_error_while_taking_jobs_keeps_every_slot(prefix: str) -> None:
    # arq 0.28 takes a slot per job before it knows it has the job, and a Redis error
    # in between kept the slot for good; the take asks Redis first, then takes slots.
    config = Config(redis_url="redis://127.0.0.1:1/0", prefix=prefix, max_jobs=2)
    worker = ReplayWorker(**worker_settings(build_app(config), config), handle_signals=False)
    free = worker.sem._value
    for _ in range(3):  # more failures than slots: none may be kept
        with pytest.raises(RedisConnectionError):
            await worker._look_at_queue(0.0)
    assert worker.job_counter == 0
    assert worker.sem._value == free
    await worker.pool.aclose(close_connection_pool=True)


async def test_a_frozen_redis_is_an_outage_too_and_the_worker_goes_on(
    prefix: str, server: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    # The queue's client has no read timeout (see worker._queue_client): what notices a
    # Redis that never answers is the bound on one poll iteration (3 probe timeouts).
    config = make_config(prefix, redis_url=server.url, redis_timeout=0.5)
    app = build_app(config)
    worker = ReplayWorker(**worker_settings(app, config), handle_signals=False)
    caplog.set_level(logging.INFO, logger="asgi_worker")

    def logged(text: str) -> bool:
        return any(text in record.getMessage() for record in caplog.records)

    async def until(text: str, within: float) -> float:
        started = time.monotonic()
        while not logged(text):
            assert time.monotonic() - started < within, f"no {text!r} within {within} s"
            assert not task.done(), "the worker ended"
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    task = asyncio.create_task(worker.async_run())
    try:
        async with serve(app) as http:
            with server.client() as client:
                for _ in range(200):  # polling: arq wrote its health check
                    if client.exists(f"{prefix}:queue:health-check"):
                        break
                    await asyncio.sleep(0.05)
            server.pause()
            try:
                noticed = await until("asgi-worker: lost Redis at", within=10)
            finally:
                server.resume()
            back = await until("is back after", within=10)
            assert logged("no answer within 4.5 s past its wait")
            assert (await http.get("/echo?frozen=1")).status_code == 202
            for _ in range(100):
                if (served := await http.get("/echo?frozen=1")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
        print(f"[frozen] lost noticed after {noticed:.1f} s, back {back:.1f} s after resume")
        assert served.status_code == 200
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
