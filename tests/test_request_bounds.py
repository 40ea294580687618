"""Every request is bounded by `redis_timeout`, whatever Redis step stalls
(docs/failure-modes.md): a stalled lookup, enqueue or release, a slow link.

Real stalls: the web process reaches the test Redis through a `ResetProxy` that holds a
connection's bytes once it sends a given script (named by its SHA-1), or every
connection's, or delays each way. Each request must answer (`202`, `503` or `200`)
within `redis_timeout` + 1 s, and once the link recovers the URL is served without
waiting out a claim's lease: a claim whose release could not be sent in time is
released in the background as soon as Redis answers again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from asgi_worker import Config, scripts
from asgi_worker.keys import RedisKeys
from asgi_worker.queue_scripts import ENQUEUE
from asgi_worker.testing import run_pending

from .apps import make_app
from .conftest import REDIS_URL
from .helpers import claim_keys, digest_of, make_config, serve
from .reset_proxy import ResetProxy, reset_proxy

TIMEOUT = 0.5
"""`redis_timeout` of these tests: every answer comes within it plus `SLACK`."""
SLACK = 1.0
LEASE = 30.0
"""A claim lease far longer than any test: a claim left to it would fail the test."""


def sha(text: str) -> bytes:
    return hashlib.sha1(text.encode()).hexdigest().encode()


LOOKUP, RELEASE, QUEUE = sha(scripts.LOOKUP), sha(scripts.RELEASE), sha(ENQUEUE)
"""What the lookup, the release of a claim and the enqueue send (EVALSHA <SHA-1>)."""


@pytest.fixture
async def proxy(redis: Redis) -> AsyncIterator[ResetProxy]:
    # Loaded already: a NOSCRIPT would send the script's text, which the cue misses.
    for text in (scripts.LOOKUP, scripts.RELEASE, ENQUEUE):
        await redis.script_load(text)
    port = urlsplit(REDIS_URL).port or 6379
    async with reset_proxy(port) as started:
        yield started


def bounded_config(prefix: str, proxy: ResetProxy, timeout: float = TIMEOUT) -> Config:
    return make_config(
        prefix, redis_url=proxy.url, redis_timeout=timeout, job_timeout=5, claim_ttl=LEASE
    )


async def timed_get(http: httpx.AsyncClient, url: str) -> tuple[int, float]:
    started = time.monotonic()
    response = await http.get(url)
    return response.status_code, time.monotonic() - started


async def answer_then_thaw(
    proxy: ResetProxy, request: asyncio.Future[tuple[int, float]], *, stalled_for: float
) -> tuple[int, float]:
    """`request`'s answer; the link recovers `stalled_for` s after it (or after it hangs).

    Meanwhile the client closes the connections it gave up on: what they held is lost.
    """
    try:
        return await asyncio.wait_for(asyncio.shield(request), 4 * TIMEOUT + SLACK)
    finally:
        await asyncio.sleep(stalled_for)
        proxy.thaw()


async def served_once_recovered(
    app: Starlette, http: httpx.AsyncClient, url: str, within: float = 3.0
) -> None:
    """`url` is served within `within` s: claimed again at once, run, then a hit."""
    deadline = time.monotonic() + within
    while (response := await http.get(url)).status_code != 200:
        assert time.monotonic() < deadline, f"{url}: still {response.status_code}"
        await run_pending(app)
        await asyncio.sleep(0.05)


async def no_claim_within(redis: Redis, prefix: str, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while await claim_keys(redis, prefix):
        assert time.monotonic() < deadline, "a claim is left to its lease"
        await asyncio.sleep(0.05)


@dataclasses.dataclass
class Web:
    """The app under test, behind the proxy, and a client on it."""

    app: Starlette
    http: httpx.AsyncClient
    redis: Redis
    prefix: str

    async def recovers(self, url: str) -> None:
        """No claim is left to its lease, and `url` is served at once."""
        await no_claim_within(self.redis, self.prefix)
        await served_once_recovered(self.app, self.http, url)


@pytest.fixture
async def web(proxy: ResetProxy, prefix: str, redis: Redis) -> AsyncIterator[Web]:
    app = make_app(bounded_config(prefix, proxy))
    async with serve(app) as http:
        yield Web(app, http, redis, prefix)


async def test_a_stalled_lookup_is_503_within_the_timeout_and_its_claim_is_released(
    proxy: ResetProxy, web: Web
) -> None:
    # Redis runs the lookup (it claims the URL) but its reply never comes back.
    proxy.stall_on(LOOKUP, times=1, replies=True)
    status, took = await timed_get(web.http, "/echo?s=1")
    assert (status, proxy.stalls) == (503, 1)
    assert took < TIMEOUT + SLACK
    # The request gave its token up with it: the claim goes at once, not in 30 s.
    await web.recovers("/echo?s=1")


async def test_a_stalled_enqueue_is_bounded_and_its_claim_released_once_redis_answers(
    proxy: ResetProxy, web: Web
) -> None:
    # The enqueue stalls, then so does every release of the claim, until the link
    # recovers: the answer may not wait for the release, and the claim is released as
    # soon as Redis answers again.
    proxy.stall_on(QUEUE, times=1)
    request = asyncio.ensure_future(timed_get(web.http, "/echo?e=1"))
    await proxy.stalled.wait()
    proxy.stall_on(RELEASE, times=100)
    status, took = await answer_then_thaw(proxy, request, stalled_for=1.0)
    assert status == 503
    assert took < TIMEOUT + SLACK
    assert proxy.stalls >= 2  # a release was tried while stalled
    await web.recovers("/echo?e=1")


async def test_a_stalled_release_after_a_failed_enqueue_is_bounded(
    proxy: ResetProxy, web: Web
) -> None:
    # The enqueue fails at once (its connection reset, twice: redis-py tries again once)
    # and the release of the claim stalls.
    proxy.reset_on(QUEUE, times=2)
    proxy.stall_on(RELEASE, times=1)
    request = asyncio.ensure_future(timed_get(web.http, "/echo?r=1"))
    status, took = await answer_then_thaw(proxy, request, stalled_for=0.5)
    assert (status, proxy.resets, proxy.stalls) == (503, 2, 1)
    assert took < TIMEOUT + SLACK
    await web.recovers("/echo?r=1")  # sent again on a connection that answers


@pytest.mark.parametrize("delay", [0.3, 0.5], ids=["300ms", "500ms"])
async def test_a_slow_link_answers_every_request_within_the_timeout(
    proxy: ResetProxy, prefix: str, redis: Redis, delay: float
) -> None:
    # 16 clients, two requests each, over a link that takes `delay` each way (their
    # connections open already): a lookup, an enqueue and the read of a 202's hint take
    # a round trip each, so some answer 202, some 503, none later than redis_timeout +
    # 1 s. Once the link is fast again every URL is served, none waiting out a lease.
    timeout = 2.0
    config = dataclasses.replace(bounded_config(prefix, proxy, timeout), adaptive_retry_after=True)
    app = make_app(config)
    urls = [f"/echo?c={n}" for n in range(16)]
    async with serve(app) as http:
        warm = await asyncio.gather(*(http.get(f"/echo?warm={n}") for n in range(16)))
        assert {response.status_code for response in warm} == {202}
        await run_pending(app)
        proxy.delay(delay, delay)
        answers = await asyncio.gather(*(timed_get(http, url) for url in urls + urls))
        proxy.delay(0, 0)
        assert {status for status, _ in answers} <= {202, 503}
        slowest = max(took for _, took in answers)
        assert slowest < timeout + SLACK, sorted(answers)
        # A claim left behind would keep its URL at 202 for the lease (30 s).
        for url in urls:
            await served_once_recovered(app, http, url)
    keys = RedisKeys(prefix)
    for url in urls:
        assert await redis.exists(keys.response(await digest_of(config, url))) == 1
