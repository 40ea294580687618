"""Redis Sentinel, for real: a master, a replica and three Sentinels (tests/own_sentinel.py),
one topology for this module, with uvicorn and `asgi-worker worker` on a
`redis+sentinel://` URL.

What must hold (docs/sentinel.md):

- a manual failover (`SENTINEL FAILOVER`, as for maintenance) costs no client a 503, and
  at most 5 % of the entries already served are lost (those written to the old master
  between the replica's promotion and Sentinel's announcement of it);
- a crash of the master (`kill -9`) is 503s only until Sentinel has failed over
  (`down-after-milliseconds` + 2 s), then every URL is served again;
- once Sentinel announces the new master (`+switch-master`), no write goes on to the old
  one, from any pool of the process;
- a plain `redis://` URL pinned to a master that a failover demoted is a 503 at once, with
  a log line that says what happened;
- the worker lives through all of it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.sentinel import Sentinel

from asgi_worker import Config
from asgi_worker.backends.redis.clients import redis_client
from asgi_worker.backends.redis.sentinel import FailoverWatch

from .own_sentinel import MASTER_NAME, Topology, own_sentinel
from .processes import Processes, asgi_worker_command, free_port, http_client, processes
from .stack import environment

pytestmark = pytest.mark.e2e

APP = "tests.sentinel_app:app"
URLS = 400
PACE = 0.01  # a new URL every 10 ms: the run spans 4 s, the fault comes at 1 s
POLL = 0.05
FAULT_AT = 1.0
REDIS_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with own_sentinel(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


@pytest.fixture
def healthy(topology: Topology) -> Topology:
    """The module's topology, healed from whatever the previous test did to it."""
    topology.wait_healthy()
    return topology


def master_client(topology: Topology) -> redis.Redis:
    """A plain client on the current master (through the Sentinels, as redis-py does)."""
    sentinel = Sentinel(
        [sentinel.address for sentinel in topology.sentinels],
        socket_timeout=2,
        socket_connect_timeout=2,
    )
    client: redis.Redis = sentinel.master_for(MASTER_NAME, socket_timeout=2)
    return client


@dataclass
class Stack:
    group: Processes
    base_url: str
    web: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None
    directory: Path

    def client(self) -> httpx.AsyncClient:
        return http_client(self.base_url, 50)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")


@contextmanager
def running(
    topology: Topology, prefix: str, directory: Path, redis_url: str, *, worker: bool = True
) -> Iterator[Stack]:
    """uvicorn (and a worker) on `redis_url`; both stopped on the way out."""
    env = environment(prefix, redis_url, redis_timeout=str(REDIS_TIMEOUT))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with processes(directory, env) as group:
        command = [sys.executable, "-m", "uvicorn", APP, "--host", "127.0.0.1"]
        web = group.start("uvicorn", [*command, "--port", str(port)])
        group.wait_for(
            "uvicorn", lambda: httpx.get(f"{base_url}/health", timeout=1.0).status_code == 200
        )
        process = None
        if worker:
            process = group.start("worker", asgi_worker_command("worker", APP))
            with master_client(topology) as client:
                health = f"{prefix}:queue:health-check"
                group.wait_for("worker", lambda: bool(client.exists(health)))
        yield Stack(group, base_url, web, process, directory)


@dataclass
class Run:
    """Every answer of one run of URLs, with when it came (seconds since the start)."""

    started: float
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    served: dict[str, float] = field(default_factory=dict)

    def statuses(self) -> Counter[int]:
        return Counter(status for _, _, status in self.answers)

    def times_of(self, status: int) -> list[float]:
        return [at for at, _, answered in self.answers if answered == status]


async def serve_all(
    http: httpx.AsyncClient, urls: list[str], *, pace: float = 0.0, within: float = 20.0
) -> Run:
    """GET each URL (one every `pace` s) until it is a 200, as a polling client does."""
    run = Run(time.monotonic())

    async def one(index: int, url: str) -> None:
        await asyncio.sleep(index * pace)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status = (await http.get(url)).status_code
            now = time.monotonic() - run.started
            run.answers.append((now, url, status))
            if status == 200:
                run.served[url] = now
                return
            await asyncio.sleep(POLL)

    await asyncio.gather(*(one(index, url) for index, url in enumerate(urls)))
    return run


async def at(seconds: float, fault: Callable[[], Any]) -> Any:
    """Run the (blocking) `fault` `seconds` from now, off the event loop."""
    await asyncio.sleep(seconds)
    return await asyncio.to_thread(fault)


def report(name: str, **figures: Any) -> None:
    """Measured figures, printed (shown with `pytest -s`, and for a failing test)."""
    print(f"[{name}] " + " ".join(f"{key}={value}" for key, value in figures.items()))


async def test_manual_failover_is_no_503_and_loses_at_most_5_percent_of_entries(
    healthy: Topology, prefix: str, tmp_path: Path
) -> None:
    topology = healthy
    urls = [f"/item?n={n}" for n in range(URLS)]
    with running(topology, prefix, tmp_path, topology.url) as stack:
        async with stack.client() as http:
            fault = asyncio.create_task(at(FAULT_AT, topology.failover))
            run = await serve_all(http, urls, pace=PACE)
            old = await fault
            topology.wait_switched(old)
            # The old master is a replica again, with the new master's data: whatever
            # it took after the promotion is gone now, and a lost entry shows.
            await asyncio.to_thread(topology.wait_healthy)
            assert topology.node_at(old).role() == "slave"
            again = await asyncio.gather(*(http.get(url) for url in urls))
            lost = [
                url
                for url, response in zip(urls, again, strict=True)
                if response.status_code != 200
            ]
            final = await serve_all(http, lost)
        worker = stack.worker
        assert worker is not None
        assert worker.poll() is None, f"the worker died\n{stack.group.logs()}"
        worker_log = stack.log("worker")
    statuses = run.statuses()
    report(
        "manual failover",
        statuses=dict(statuses),
        served_before_recheck=len(run.served),
        lost=len(lost),
        lost_percent=f"{100 * len(lost) / URLS:.1f}",
        run_seconds=f"{max(at for at, _, _ in run.answers):.2f}",
    )
    assert statuses[503] == 0, f"{statuses}\n{stack.group.logs()}"
    assert len(run.served) == URLS, statuses
    assert len(lost) <= URLS * 0.05, f"lost {len(lost)} entries: {lost[:10]}..."
    assert len(final.served) == len(lost)  # every URL is served in the end
    assert "Sentinel switched 'mymaster'" in worker_log


async def test_master_crash_is_503_only_until_sentinel_fails_over(
    healthy: Topology, prefix: str, tmp_path: Path
) -> None:
    topology = healthy
    urls = [f"/item?n={n}" for n in range(URLS)]
    down_after = topology.down_after_ms / 1000
    with running(topology, prefix, tmp_path, topology.url) as stack:
        async with stack.client() as http:
            master = topology.master()

            def crash() -> float:
                # The moment the signal is sent: kill() returns only once the process is
                # reaped, and requests in flight are answered 503 meanwhile.
                sent = time.monotonic()
                master.kill()
                return sent

            fault = asyncio.create_task(at(FAULT_AT, crash))
            run = await serve_all(http, urls, pace=PACE, within=30)
            killed_at = await fault - run.started
            topology.wait_switched(master.address)
        worker = stack.worker
        assert worker is not None
        assert worker.poll() is None, f"the worker died\n{stack.group.logs()}"
        worker_log = stack.log("worker")
    unavailable = run.times_of(503)
    statuses = run.statuses()
    report(
        "master crash",
        statuses=dict(statuses),
        first_503_after_kill=f"{min(unavailable) - killed_at:.2f}" if unavailable else "-",
        last_503_after_kill=f"{max(unavailable) - killed_at:.2f}" if unavailable else "-",
        served=len(run.served),
    )
    assert len(run.served) == URLS, statuses  # every URL served in the end
    assert all(killed_at <= when <= killed_at + down_after + 2.0 for when in unavailable), (
        f"503s at {[round(when - killed_at, 2) for when in unavailable]} s after the kill"
    )
    assert set(statuses) <= {200, 202, 503}, statuses
    assert "Sentinel switched 'mymaster'" in worker_log


async def test_after_switch_master_no_write_goes_to_the_old_master(healthy: Topology) -> None:
    # Two clients with pools of their own, as the web process has (cache and queue): each
    # writes numbers in a loop while the master is failed over. The watch drops both
    # pools on Sentinel's announcement; every write *sent* after that must be on the new
    # master, whatever became of the writes before it.
    topology = healthy
    config = Config(redis_url=topology.url, prefix="switch", redis_timeout=REDIS_TIMEOUT)
    clients = [redis_client(topology.url, config, read_timeout=False) for _ in range(2)]
    watch = FailoverWatch.for_pools(
        *(client.connection_pool for client in clients), connect_timeout=REDIS_TIMEOUT
    )
    assert watch is not None
    watch.start()
    after_switch: list[list[int]] = [[], []]
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    async def write(index: int) -> None:
        key, number = f"switch:{index}", 0
        while not stop.is_set():
            number += 1
            switched = watch.switches > 0  # decided before the command is sent
            try:
                await clients[index].rpush(key, number)
            except redis.RedisError as error:
                errors[type(error).__name__] += 1
                await asyncio.sleep(0.01)
                continue
            if switched:
                after_switch[index].append(number)

    try:
        await asyncio.gather(*(client.delete(f"switch:{n}") for n, client in enumerate(clients)))
        writers = [asyncio.create_task(write(index)) for index in range(2)]
        await asyncio.sleep(0.3)
        started = time.monotonic()
        old = await asyncio.to_thread(topology.failover)
        await asyncio.to_thread(topology.wait_switched, old)
        switched_in = time.monotonic() - started
        # Keep writing until the old master is a replica (and has thrown away what it took).
        await asyncio.to_thread(topology.wait_healthy)
        demoted_in = time.monotonic() - started
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*writers)
    finally:
        await watch.stop()
        for client in clients:
            await client.aclose(close_connection_pool=True)
    with master_client(topology) as client:
        kept = [{int(value) for value in client.lrange(f"switch:{n}", 0, -1)} for n in range(2)]
    missing = [sorted(set(after_switch[n]) - kept[n]) for n in range(2)]
    report(
        "switch-master",
        switched_in=f"{switched_in:.2f}",
        demoted_in=f"{demoted_in:.2f}",
        writes_after_switch=[len(numbers) for numbers in after_switch],
        missing=[len(numbers) for numbers in missing],
        errors=dict(errors),
        drops=watch.switches,
    )
    assert watch.switches >= 1
    assert all(after_switch), "no write was sent after the switch: the test proves nothing"
    assert missing == [[], []], (
        f"writes sent after +switch-master were lost: {[len(m) for m in missing]} "
        f"(first: {[m[:5] for m in missing]})"
    )


@asynccontextmanager
async def pinned_web(
    topology: Topology, prefix: str, directory: Path, url: str
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    with running(topology, prefix, directory, url, worker=False) as stack:
        async with stack.client() as http:
            yield stack, http


async def test_a_url_pinned_to_the_demoted_master_is_a_503_with_a_clear_log(
    healthy: Topology, prefix: str, tmp_path: Path
) -> None:
    topology = healthy
    master = topology.master()
    pinned = f"redis://127.0.0.1:{master.port}/0"  # not through the Sentinels
    async with pinned_web(topology, prefix, tmp_path, pinned) as (stack, http):
        assert (await http.get("/item?n=before")).status_code == 202
        old = topology.failover()
        topology.wait_switched(old)
        deadline = time.monotonic() + 15
        while master.role() != "slave":  # Sentinel turns the old master into a replica
            assert time.monotonic() < deadline, topology.logs()
            await asyncio.sleep(0.05)
        started = time.monotonic()
        answer = await http.get("/item?n=after")
        waited = time.monotonic() - started
        log = stack.log("uvicorn")
    report("pinned URL", status=answer.status_code, waited=f"{waited:.3f}")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert waited < REDIS_TIMEOUT
    assert "asgi-worker: cache backend unavailable: ReadOnlyReplicaError(" in log, log
    assert "is a read-only replica: a master that a failover demoted?" in log, log
    assert "A redis+sentinel:// URL follows the master." in log, log
