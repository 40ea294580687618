"""Freshness, stale-while-revalidate, stale-if-error, ETag/304, tags and invalidation,
through the middleware, on every backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.invalidation import Invalidator
from asgi_worker.testing import run_pending

from .conftest import WITH_CLUSTER, backend
from .helpers import backend_config, serve

HIT = "asgi-worker; hit"
STALE = "asgi-worker; hit; fwd=stale"


# Every test here runs on the Cluster too.
kind = pytest.fixture(params=WITH_CLUSTER, name="kind")(backend)


@dataclass
class Control:
    """What the test app does next; the test flips these."""

    runs: int = 0
    fail: bool = False
    delay: float = 0.0
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event | None = None


def control_app(config: Config, control: Control) -> Starlette:
    async def counter(request: Request) -> Response:
        control.runs += 1
        control.entered.set()
        if control.gate is not None:
            await control.gate.wait()
        await asyncio.sleep(control.delay)
        if control.fail:
            raise RuntimeError("refresh failed")
        headers = {}
        if "cc" in request.query_params:
            headers["cache-control"] = request.query_params["cc"]
        if "tags" in request.query_params:
            headers["surrogate-key"] = request.query_params["tags"]
        return PlainTextResponse(f"run {control.runs}", headers=headers)

    app = Starlette(routes=[Route("/counter", counter), Route("/other/{rest:path}", counter)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@dataclass
class Site:
    app: Starlette
    http: httpx.AsyncClient
    control: Control

    async def ready(self, url: str) -> httpx.Response:
        """GET once (202), run the job, GET again: the stored response."""
        first = await self.http.get(url)
        assert first.status_code == 202, first
        await run_pending(self.app)
        response = await self.http.get(url)
        assert response.headers["cache-status"] == HIT
        return response


async def open_site(kind: str, config: Config, **changes: object) -> AsyncIterator[Site]:
    control = Control()
    app = control_app(backend_config(kind, config, **changes), control)
    async with serve(app) as http:
        yield Site(app, http, control)


@pytest.fixture
async def site(kind: str, config: Config) -> AsyncIterator[Site]:
    async for value in open_site(kind, config, ttl=60, min_ttl=0.1):
        yield value


async def test_app_max_age_sets_freshness(site: Site) -> None:
    await site.ready("/counter?cc=max-age%3D1")
    await asyncio.sleep(1.1)
    assert (await site.http.get("/counter?cc=max-age%3D1")).status_code == 202


async def test_s_maxage_wins_over_max_age(site: Site) -> None:
    await site.ready("/counter?cc=max-age%3D100,%20s-maxage%3D1")
    await asyncio.sleep(1.1)
    assert (await site.http.get("/counter?cc=max-age%3D100,%20s-maxage%3D1")).status_code == 202


async def test_private_and_set_cookie_responses_are_never_shared(site: Site) -> None:
    await site.http.get("/counter?cc=private")
    await run_pending(site.app)
    assert site.control.runs == 1
    # Hit-for-pass: the next requests go straight to the app, nothing stored is served.
    for expected in (2, 3):
        direct = await site.http.get("/counter?cc=private")
        assert direct.status_code == 200
        assert direct.text == f"run {expected}"
        assert "cache-status" not in direct.headers
    assert await run_pending(site.app) == 0


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
    kind: str, config: Config
) -> None:
    async for site in open_site(kind, config, ttl=0.2, stale_ttl=30):
        first = await site.ready("/counter")
        assert first.text == "run 1"
        await asyncio.sleep(0.3)
        site.control.delay = 0.2  # a slow refresh: the stale copy must not wait for it
        stale = await asyncio.gather(*(site.http.get("/counter") for _ in range(50)))
        assert {(r.status_code, r.text, r.headers["cache-status"]) for r in stale} == {
            (200, "run 1", STALE)
        }
        await run_pending(site.app)
        assert site.control.runs == 2  # exactly one refresh for 50 stale hits
        fresh = await site.http.get("/counter")
        assert (fresh.text, fresh.headers["cache-status"]) == ("run 2", HIT)


async def test_app_stale_while_revalidate_directive(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, min_ttl=0.1):
        url = "/counter?cc=max-age%3D0,%20stale-while-revalidate%3D30"
        await site.ready(url)
        await asyncio.sleep(0.15)
        stale = await site.http.get(url)
        assert (stale.text, stale.headers["cache-status"]) == ("run 1", STALE)


async def test_failed_refresh_keeps_serving_the_stale_copy(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, ttl=0.2, stale_ttl=30, error_ttl=0.3):
        await site.ready("/counter")
        await asyncio.sleep(0.3)
        site.control.fail = True
        assert (await site.http.get("/counter")).headers["cache-status"] == STALE
        await run_pending(site.app)
        assert site.control.runs == 2
        kept = await site.http.get("/counter")
        assert (kept.status_code, kept.text, kept.headers["cache-status"]) == (200, "run 1", STALE)
        assert await run_pending(site.app) == 0  # backing off for error_ttl: no new refresh
        await asyncio.sleep(0.35)
        site.control.fail = False
        await site.http.get("/counter")
        await run_pending(site.app)
        assert (await site.http.get("/counter")).text == "run 3"


async def test_etag_and_conditional_requests(site: Site) -> None:
    response = await site.ready("/counter")
    etag = response.headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    again = await site.http.get("/counter")
    assert again.headers["etag"] == etag  # computed once, at store time
    for condition in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        not_modified = await site.http.get("/counter", headers={"if-none-match": condition})
        assert not_modified.status_code == 304, condition
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == etag
        assert "content-type" not in not_modified.headers
        assert not_modified.headers["cache-status"] == HIT
        assert "age" in not_modified.headers
    other = await site.http.get("/counter", headers={"if-none-match": '"nope"'})
    assert (other.status_code, other.text) == (200, "run 1")
    head = await site.http.head("/counter", headers={"if-none-match": etag})
    assert head.status_code == 304


async def test_age_grows(site: Site) -> None:
    await site.ready("/counter")
    await asyncio.sleep(1.05)
    assert int((await site.http.get("/counter")).headers["age"]) >= 1


async def test_tags_are_stripped_and_invalidate(site: Site) -> None:
    tagged = await site.ready("/counter?tags=report-42%20user-7")
    assert "surrogate-key" not in tagged.headers
    await site.ready("/counter?tags=user-8")
    invalidator = Invalidator.for_app(site.app)
    assert await invalidator.tag("report-42") == 1
    assert (await site.http.get("/counter?tags=report-42%20user-7")).status_code == 202
    assert (await site.http.get("/counter?tags=user-8")).status_code == 200


async def test_invalidation_forms_through_the_middleware(site: Site) -> None:
    for url in ("/counter?a=1&b=2", "/counter?a=2", "/other/x", "/other/y/z"):
        await site.ready(url)
    invalidator = Invalidator.for_app(site.app)
    assert await invalidator.query("/counter", {"b": "2"}) == 1
    assert (await site.http.get("/counter?a=1&b=2")).status_code == 202
    assert (await site.http.get("/counter?a=2")).status_code == 200
    await run_pending(site.app)  # a=1&b=2 stored again
    assert await invalidator.prefix("/other/") == 2
    assert (await site.http.get("/other/y/z")).status_code == 202
    assert (await site.http.get("/counter?a=1&b=2")).status_code == 200
    assert await invalidator.path("/counter") == 2
    assert (await site.http.get("/counter?a=2")).status_code == 202
    assert (await site.http.get("/counter?a=1&b=2")).status_code == 202


async def test_soft_invalidation_serves_stale_while_one_refresh_runs(site: Site) -> None:
    await site.ready("/counter")
    assert await Invalidator.for_app(site.app).path("/counter", soft=True) == 1
    stale = await asyncio.gather(*(site.http.get("/counter") for _ in range(10)))
    assert {(r.text, r.headers["cache-status"]) for r in stale} == {("run 1", STALE)}
    await run_pending(site.app)
    assert site.control.runs == 2
    assert (await site.http.get("/counter")).text == "run 2"


async def test_a_job_running_during_an_invalidation_does_not_store(site: Site) -> None:
    assert (await site.http.get("/counter")).status_code == 202
    site.control.gate = asyncio.Event()
    jobs = asyncio.create_task(run_pending(site.app))
    await asyncio.wait_for(site.control.entered.wait(), 10)  # the job is inside the app
    await Invalidator.for_app(site.app).path("/counter")  # data changed meanwhile
    site.control.gate.set()
    await asyncio.wait_for(jobs, 10)
    site.control.gate = None
    # The old result was refused: the next GET starts a new job, which stores run 2.
    assert (await site.http.get("/counter")).status_code == 202
    await run_pending(site.app)
    assert (await site.http.get("/counter")).text == "run 2"
