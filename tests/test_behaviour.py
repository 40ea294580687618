"""One behaviour suite, run on every backend: a difference between them is a failing test.

- `arq`: Redis store, jobs on an arq queue, run by a real arq worker (burst mode).
- `inline`: Redis store, jobs run as tasks in the web process (`inline_worker=True`).
- `memory`: the embedded `memory://` store and in-process jobs.
- `cluster`: the store on a Redis Cluster of 3 masters (started once for this module),
  jobs on an arq queue on the plain test Redis, run by a real arq worker.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from starlette.applications import Starlette

from asgi_worker import Config
from asgi_worker.testing import run_pending

from .apps import make_app
from .conftest import WITH_CLUSTER, backend
from .helpers import backend_config, serve


@dataclass
class Harness:
    app: Starlette
    http: httpx.AsyncClient
    calls: Counter[str]

    async def run_jobs(self) -> int:
        return await run_pending(self.app)


async def harness_for(config: Config) -> AsyncIterator[Harness]:
    calls: Counter[str] = Counter()
    app = make_app(config, calls)
    async with serve(app) as http:
        yield Harness(app, http, calls)


kind = pytest.fixture(params=WITH_CLUSTER, name="kind")(backend)


@pytest.fixture
async def harness(kind: str, config: Config) -> AsyncIterator[Harness]:
    async for value in harness_for(backend_config(kind, config)):
        yield value


async def test_miss_then_hit_returns_what_the_app_returns(harness: Harness) -> None:
    first = await harness.http.get("/echo?x=1&y=2")
    assert (first.status_code, first.headers["cache-status"]) == (202, "asgi-worker; fwd=uri-miss")
    assert first.headers["retry-after"] == "1"
    assert await harness.run_jobs() == 1
    hit = await harness.http.get("/echo?x=1&y=2")
    assert hit.status_code == 200
    assert hit.headers["cache-status"] == "asgi-worker; hit"
    assert int(hit.headers["age"]) >= 0
    assert hit.json() == {
        "path": "/echo",
        "query": "x=1&y=2",
        "host": "testserver",
        "headers": ["host"],
        "startup": True,  # lifespan state reached the replay
    }
    assert harness.calls["/echo"] == 1


async def test_concurrent_cold_requests_run_the_endpoint_once(harness: Harness) -> None:
    answers = await asyncio.gather(*(harness.http.get("/echo?cold") for _ in range(200)))
    assert {answer.status_code for answer in answers} <= {202, 200}
    await harness.run_jobs()
    assert harness.calls["/echo"] == 1
    later = await asyncio.gather(*(harness.http.get("/echo?cold") for _ in range(20)))
    assert {answer.status_code for answer in later} == {200}
    assert harness.calls["/echo"] == 1


async def test_streaming_body_is_stored_whole(harness: Harness) -> None:
    assert (await harness.http.get("/stream")).status_code == 202
    await harness.run_jobs()
    hit = await harness.http.get("/stream")
    assert hit.status_code == 200
    assert hit.content == b"chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;"
    assert hit.headers["content-length"] == str(len(hit.content))


async def test_head_is_looked_up_as_get_and_gets_no_body(harness: Harness) -> None:
    miss = await harness.http.head("/echo?h")
    assert miss.status_code == 202
    await harness.run_jobs()
    head = await harness.http.head("/echo?h")
    get = await harness.http.get("/echo?h")
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
    assert harness.calls["/echo"] == 1


async def test_app_exception_stores_a_generic_500(harness: Harness) -> None:
    assert (await harness.http.get("/boom")).status_code == 202
    await harness.run_jobs()
    error = await harness.http.get("/boom")
    assert error.status_code == 500
    assert error.text == "Internal Server Error"
    assert "secret" not in error.text
    assert error.headers["cache-status"] == "asgi-worker; hit"


@pytest.mark.parametrize(
    "headers",
    [{"authorization": "Bearer token"}, {"cookie": "session=1"}],
    ids=["authorization", "cookie"],
)
async def test_credentials_bypass_the_cache(harness: Harness, headers: dict[str, str]) -> None:
    response = await harness.http.get("/echo?private", headers=headers)
    assert response.status_code == 200
    assert "cache-status" not in response.headers
    assert harness.calls["/echo"] == 1
    assert await harness.run_jobs() == 0


async def test_other_methods_pass_through(harness: Harness) -> None:
    response = await harness.http.post("/post")
    assert (response.status_code, response.text) == (201, "posted")
    assert harness.calls["/post"] == 1
    assert await harness.run_jobs() == 0


async def test_entries_expire_after_ttl(kind: str, config: Config) -> None:
    async for harness in harness_for(backend_config(kind, config, ttl=0.3)):
        await harness.http.get("/echo?ttl")
        await harness.run_jobs()
        assert (await harness.http.get("/echo?ttl")).status_code == 200
        await asyncio.sleep(0.4)
        assert (await harness.http.get("/echo?ttl")).status_code == 202
        await harness.run_jobs()
        assert harness.calls["/echo"] == 2


async def test_excluded_paths_go_straight_to_the_app(kind: str, config: Config) -> None:
    async for harness in harness_for(backend_config(kind, config, exclude=("/echo",))):
        response = await harness.http.get("/echo")
        assert response.status_code == 200
        assert "cache-status" not in response.headers
        assert harness.calls["/echo"] == 1
