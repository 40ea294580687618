"""Load: many concurrent requests over real HTTP to uvicorn, one worker subprocess.

Correctness under load, not speed (speed is measured in benchmarks/): however many
requests arrive at once, each URL's endpoint runs exactly once, every URL ends up
served, and no request gets a 5xx. Bounded in time: the whole file takes well under a
minute on two cores.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .stack import HIT, MISS, Stack, get_until_ready, running_stack

pytestmark = pytest.mark.e2e

CLIENT_CONCURRENCY = 200
# 200 connections, as 20 clients of 10: one httpx pool of 200 costs several times the CPU
# per request (its pool bookkeeping grows with its size), and the client would be the
# bottleneck of the whole test.
CLIENTS = 20
READY_SECONDS = 40.0


UVICORN_ARGS = ("--no-access-log", "--log-level", "warning", "--backlog", "4096")


@pytest.fixture
def stack(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with running_stack(prefix, tmp_path, uvicorn_args=UVICORN_ARGS, max_jobs="50") as running:
        yield running


@pytest.fixture
def two_web_processes(prefix: str, tmp_path: Path) -> Iterator[Stack]:
    """uvicorn with two worker processes: two middlewares race for every claim."""
    with running_stack(
        prefix, tmp_path, uvicorn_args=(*UVICORN_ARGS, "--workers", "2"), max_jobs="50"
    ) as running:
        yield running


class Clients:
    """Round-robin over CLIENTS httpx clients; at most CLIENT_CONCURRENCY requests in flight."""

    def __init__(self, stack: Stack) -> None:
        per_client = CLIENT_CONCURRENCY // CLIENTS
        self._clients = [stack.client(connections=per_client) for _ in range(CLIENTS)]
        self._slots = asyncio.Semaphore(CLIENT_CONCURRENCY)

    async def __aenter__(self) -> Clients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.aclose()

    @property
    def first(self) -> httpx.AsyncClient:
        return self._clients[0]

    async def get_all(self, urls: list[str]) -> list[httpx.Response]:
        """GET every URL concurrently."""

        async def one(number: int, url: str) -> httpx.Response:
            async with self._slots:
                return await self._clients[number % CLIENTS].get(url)

        return await asyncio.gather(*(one(number, url) for number, url in enumerate(urls)))


def assert_no_server_error(responses: list[httpx.Response]) -> Counter[int]:
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {200, 202}, statuses
    for response in responses:
        expected = MISS if response.status_code == 202 else HIT
        assert response.headers["cache-status"] == expected
    return statuses


async def test_1000_concurrent_cold_gets_of_one_url_run_it_once(
    two_web_processes: Stack,
) -> None:
    stack = two_web_processes
    url = "/hang?seconds=1&case=one"
    async with Clients(stack) as clients:
        cold = await clients.get_all([url] * 1000)
        statuses = assert_no_server_error(cold)
        assert statuses[202] >= 1, statuses
        served = await get_until_ready(clients.first, url, within=15)
    assert served.status_code == 200
    assert served.json() == {"url": url, "pid": stack.worker.pid, "run": 1}
    assert stack.runs("/hang") == 1
    assert stack.runs_by_url() == {url: 1}
    for response in cold:
        if response.status_code == 200:
            assert response.content == served.content


async def test_1000_urls_requested_3_times_each_are_all_served_once(stack: Stack) -> None:
    urls = [f"/hang?seconds=0.05&id={number}" for number in range(1000)]
    requests = urls * 3
    random.Random(5).shuffle(requests)
    served: dict[str, httpx.Response] = {}
    async with Clients(stack) as clients:
        cold = await clients.get_all(requests)
        assert_no_server_error(cold)
        for url, response in zip(requests, cold, strict=True):
            if response.status_code == 200:
                served[url] = response

        deadline = time.monotonic() + READY_SECONDS
        while len(served) < len(urls):
            assert time.monotonic() < deadline, (
                f"{len(urls) - len(served)} URLs still 202 after {READY_SECONDS}s\n{stack.logs()}"
            )
            await asyncio.sleep(0.5)
            pending = [url for url in urls if url not in served]
            answers = await clients.get_all(pending)
            assert_no_server_error(answers)
            for url, response in zip(pending, answers, strict=True):
                if response.status_code == 200:
                    served[url] = response

    for url in urls:
        assert served[url].json() == {
            "url": url,
            "pid": stack.worker.pid,
            "run": served[url].json()["run"],
        }
    # Exactly once per URL, across both processes, and never in the web process.
    assert stack.runs_by_url() == dict.fromkeys(urls, 1)
    assert stack.runs("/hang") == len(urls)
    assert sorted(response.json()["run"] for response in served.values()) == list(
        range(1, len(urls) + 1)
    )
