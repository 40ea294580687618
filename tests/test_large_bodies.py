"""Large bodies: stored apart from their entry, streamed to hits a chunk at a time.

Every test runs on each backend and on a Redis Cluster: bodies at, below and above
`Config.stream_body_bytes` are served byte for byte (GET, HEAD, Range, 304), the body key
lives and dies with its entry, a body gone mid-stream cuts the response short, and one
gone before its first byte is a miss that runs the job again.
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.apptree import walk
from asgi_worker.connections import close_client, store_client
from asgi_worker.invalidation import Invalidator
from asgi_worker.keys import RedisKeys
from asgi_worker.responses import (
    BODY_CHUNK,
    BodyGoneError,
    RangeNotSatisfiableError,
    byte_range,
)
from asgi_worker.store import REPLACED_BODY_GRACE
from asgi_worker.testing import run_pending

from .conftest import WITH_CLUSTER, backend
from .helpers import backend_config, digest_of, scope_of, serve

THRESHOLD = 300_000
"""`stream_body_bytes` here: small, so that a body of a few chunks is quick."""
BIG = 3 * BODY_CHUNK + 12_345
"""A body stored apart that spans four chunks, the last one short."""

kind = pytest.fixture(params=WITH_CLUSTER, name="kind")(backend)


def body_of(size: int, seed: int = 0) -> bytes:
    """Random bytes: a chunk sent at the wrong offset can never look right."""
    return random.Random(f"{seed}:{size}").randbytes(size)


@dataclass
class Site:
    app: Starlette
    http: httpx.AsyncClient
    config: Config
    redis: Redis | RedisCluster | None
    """The store's Redis (None on memory://)."""
    runs: list[str] = field(default_factory=list)
    tap: Tap | None = None

    async def ready(self, url: str) -> httpx.Response:
        """GET once (202), run the job, GET again: the stored response."""
        assert (await self.http.get(url)).status_code == 202
        await run_pending(self.app)
        response = await self.http.get(url)
        assert response.status_code == 200, response
        assert response.headers["cache-status"] == "asgi-worker; hit"
        return response

    async def body_key(self, url: str) -> str | None:
        """The key of the body stored apart of `url`'s entry, if it has one."""
        assert self.redis is not None
        digest = await digest_of(self.config, url)
        name = await self.redis.get(RedisKeys(self.config.prefix).body_ref(digest))
        return None if name is None else str(name.decode())


class Tap:
    """An ASGI layer that records what the app sends, and acts after its first chunk."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.messages: list[Message] = []
        self.after_first_chunk: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.messages = []

        async def tapped(message: Message) -> None:
            self.messages.append(message)
            bodies = [m for m in self.messages if m["type"] == "http.response.body"]
            if len(bodies) == 1 and self.after_first_chunk is not None:
                await self.after_first_chunk()
            await send(message)

        await self.app(scope, receive, tapped)


def big_app(config: Config, runs: list[str]) -> Starlette:
    async def big(request: Request) -> Response:
        size = int(request.query_params["n"])
        seed = int(request.query_params.get("seed", "0"))
        runs.append(request.url.path)
        body = body_of(size, seed)
        headers = {"cache-control": request.query_params.get("cc", "max-age=60")}
        if "tags" in request.query_params:
            headers["surrogate-key"] = request.query_params["tags"]
        if request.query_params.get("mode") == "chunks":
            # Odd-sized chunks, as a streaming app sends them: never aligned with ours.

            async def pieces() -> AsyncIterator[bytes]:
                for at in range(0, size, 70_001):
                    yield body[at : at + 70_001]

            return StreamingResponse(pieces(), headers=headers, media_type="application/x-bin")
        return Response(body, headers=headers, media_type="application/x-bin")

    app = Starlette(routes=[Route("/big", big), Route("/other/{rest:path}", big)])
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@pytest.fixture
async def site(kind: str, config: Config, request: pytest.FixtureRequest) -> AsyncIterator[Site]:
    changes = {"stream_body_bytes": THRESHOLD, **getattr(request, "param", {})}
    configured = backend_config(kind, config, **changes)
    runs: list[str] = []
    app = big_app(configured, runs)
    tap = Tap(app)
    redis = None if kind == "memory" else store_client(configured.redis_url, configured)
    try:
        async with serve(tap) as http:
            yield Site(app, http, configured, redis, runs, tap)
    finally:
        if redis is not None:
            await close_client(redis)


def ranges(size: int) -> Iterator[tuple[str, int, int]]:
    """`Range` headers and the bytes (start, stop) each asks of a body of `size`."""
    yield f"bytes=0-{size - 1}", 0, size
    yield "bytes=10-19", 10, 20
    if size > BODY_CHUNK + 10:
        # Across one chunk boundary, and starting on one.
        yield f"bytes={BODY_CHUNK - 7}-{BODY_CHUNK + 9}", BODY_CHUNK - 7, BODY_CHUNK + 10
        yield f"bytes={BODY_CHUNK}-", BODY_CHUNK, size
    if size > 2 * BODY_CHUNK + 10:  # across two boundaries
        yield f"bytes={BODY_CHUNK - 1}-{2 * BODY_CHUNK}", BODY_CHUNK - 1, 2 * BODY_CHUNK + 1
    yield "bytes=-1000", size - 1000, size
    yield f"bytes={size - 5}-{size + 100}", size - 5, size  # the end clipped


@pytest.mark.parametrize("mode", ["whole", "chunks"])
@pytest.mark.parametrize(
    "size", [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, BIG], ids=["below", "at", "above", "big"]
)
async def test_bodies_are_served_byte_for_byte_below_at_and_above_the_threshold(
    site: Site, size: int, mode: str
) -> None:
    url = f"/big?n={size}&mode={mode}"
    body = body_of(size)
    hit = await site.ready(url)
    assert hit.content == body
    assert hit.headers["content-length"] == str(size)
    etag = hit.headers["etag"]
    if site.redis is not None:
        # Apart exactly when larger than the threshold.
        assert (await site.body_key(url) is not None) == (size > THRESHOLD)
    again = await site.http.get(url)  # a second hit streams it again
    assert again.content == body
    assert again.headers["etag"] == etag
    head = await site.http.head(url)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(size)
    assert head.headers["etag"] == etag
    not_modified = await site.http.get(url, headers={"if-none-match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    for wanted, start, stop in ranges(size):
        part = await site.http.get(url, headers={"range": wanted})
        assert part.status_code == 206, wanted
        assert part.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert part.headers["content-length"] == str(stop - start)
        assert part.content == body[start:stop], wanted
    assert site.runs == ["/big"]


async def test_range_edge_cases_on_a_body_stored_apart(site: Site) -> None:
    url = f"/big?n={BIG}"
    body = body_of(BIG)
    etag = (await site.ready(url)).headers["etag"]
    unsatisfiable = await site.http.get(url, headers={"range": f"bytes={BIG}-"})
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{BIG}"
    assert unsatisfiable.content == b""
    # Several ranges, another unit, nonsense: the whole body, as if no Range were sent.
    for ignored in ("bytes=0-1,5-9", "items=0-1", "bytes=5-2", "bytes=x-"):
        whole = await site.http.get(url, headers={"range": ignored})
        assert (whole.status_code, whole.content) == (200, body), ignored
    # If-Range: the range only while the ETag still matches.
    matching = await site.http.get(url, headers={"range": "bytes=5-9", "if-range": etag})
    assert (matching.status_code, matching.content) == (206, body[5:10])
    stale = await site.http.get(url, headers={"range": "bytes=5-9", "if-range": '"old"'})
    assert (stale.status_code, stale.content) == (200, body)
    head = await site.http.head(url, headers={"range": "bytes=5-9"})
    assert (head.status_code, head.headers["content-length"], head.content) == (206, "5", b"")


@pytest.mark.parametrize("invalidation", ["path", "tag", "glob"])
async def test_invalidation_deletes_the_body_with_its_entry(site: Site, invalidation: str) -> None:
    url = f"/big?n={BIG}&tags=reports"
    await site.ready(url)
    key = await site.body_key(url) if site.redis is not None else None
    invalidator = Invalidator.for_app(site.app)
    if invalidation == "path":
        assert await invalidator.path("/big") == 1
    elif invalidation == "tag":
        assert await invalidator.tag("reports") == 1
    else:
        assert await invalidator.glob("/b*") == 1
    if site.redis is not None:
        assert key is not None
        assert not await site.redis.exists(key)
        assert await site.body_key(url) is None
    assert (await site.http.get(url)).status_code == 202
    await run_pending(site.app)
    assert (await site.http.get(url)).content == body_of(BIG)


async def test_soft_invalidation_serves_the_stale_body_whole_then_the_new_one(site: Site) -> None:
    url = f"/big?n={BIG}"
    await site.ready(url)
    assert await Invalidator.for_app(site.app).path("/big", soft=True) == 1
    stale = await site.http.get(url)
    assert stale.headers["cache-status"] == "asgi-worker; hit; fwd=stale"
    assert stale.content == body_of(BIG)
    part = await site.http.get(url, headers={"range": f"bytes={BODY_CHUNK - 3}-{BODY_CHUNK + 3}"})
    assert part.content == body_of(BIG)[BODY_CHUNK - 3 : BODY_CHUNK + 4]
    await run_pending(site.app)
    assert len(site.runs) == 2
    fresh = await site.http.get(url)
    assert fresh.headers["cache-status"] == "asgi-worker; hit"
    assert fresh.content == body_of(BIG)


@pytest.mark.parametrize("site", [{"ttl": 1, "min_ttl": 0.1}], indirect=True)
async def test_the_body_expires_with_its_entry(site: Site) -> None:
    url = f"/big?n={BIG}&cc=max-age%3D1"
    await site.ready(url)
    if site.redis is not None:
        digest = await digest_of(site.config, url)
        key = await site.body_key(url)
        assert key is not None
        entry_ms = await site.redis.pttl(RedisKeys(site.config.prefix).response(digest))
        body_ms = await site.redis.pttl(key)
        assert 0 < entry_ms <= 1000
        assert abs(entry_ms - body_ms) < 50
    await asyncio.sleep(1.1)
    assert (await site.http.get(url)).status_code == 202
    if site.redis is not None:
        assert key is not None
        assert not await site.redis.exists(key)


async def test_a_newer_commit_stores_a_new_body_and_the_old_one_goes_soon(site: Site) -> None:
    url = f"/big?n={BIG}"
    await site.ready(url)
    old = await site.body_key(url) if site.redis is not None else None
    await Invalidator.for_app(site.app).path("/big", soft=True)
    assert (await site.http.get(url)).status_code == 200  # stale, and a refresh enqueued
    await run_pending(site.app)
    assert (await site.http.get(url)).content == body_of(BIG)
    if site.redis is not None:
        new = await site.body_key(url)
        assert old is not None
        assert new not in (None, old)
        # Kept a little while for hits still streaming it, no longer.
        assert 0 < await site.redis.pttl(old) <= REPLACED_BODY_GRACE * 1000


async def test_a_body_gone_mid_stream_cuts_the_response_short(site: Site) -> None:
    url = f"/big?n={BIG}"
    body = body_of(BIG)
    await site.ready(url)
    assert site.tap is not None

    async def invalidate() -> None:
        await Invalidator.for_app(site.app).path("/big")

    site.tap.after_first_chunk = invalidate
    with pytest.raises(BodyGoneError):
        await site.http.get(url)
    start, *chunks = site.tap.messages
    assert start["status"] == 200
    assert dict(start["headers"])[b"content-length"] == str(BIG).encode()
    sent = b"".join(message["body"] for message in chunks)
    # Never completed, never a wrong byte: what was sent is the body's beginning.
    assert all(message.get("more_body") for message in chunks)
    assert 0 < len(sent) < BIG
    assert body.startswith(sent)
    site.tap.after_first_chunk = None
    assert (await site.http.get(url)).status_code == 202  # invalidated: a miss


@pytest.mark.parametrize("damage", ["deleted", "truncated", "ref-gone"])
async def test_a_missing_or_corrupt_body_is_a_miss_and_the_job_runs_again(
    site: Site, damage: str, kind: str
) -> None:
    if site.redis is None:
        pytest.skip("memory:// has no body key to damage")
    url = f"/big?n={BIG}"
    await site.ready(url)
    key = await site.body_key(url)
    assert key is not None
    if damage == "deleted":
        await site.redis.delete(key)
    elif damage == "truncated":
        await site.redis.set(key, b"short", keepttl=True)
    else:
        await site.redis.delete(
            RedisKeys(site.config.prefix).body_ref(await digest_of(site.config, url))
        )
        await site.redis.delete(key)
    missed = await site.http.get(url)
    assert missed.status_code == 202
    assert missed.headers["cache-status"] == "asgi-worker; fwd=uri-miss"
    await run_pending(site.app)
    assert site.runs == ["/big", "/big"]
    assert (await site.http.get(url)).content == body_of(BIG)
    head = await site.http.head(url)
    assert head.headers["content-length"] == str(BIG)


async def test_a_big_body_never_enters_the_near_cache(kind: str, config: Config) -> None:
    if kind == "memory":
        pytest.skip("the near cache is Redis's")
    configured = backend_config(
        kind, config, stream_body_bytes=THRESHOLD, near_cache_ttl=30, near_cache_bytes=100_000_000
    )
    runs: list[str] = []
    app = big_app(configured, runs)
    async with serve(app) as http:
        small, big = "/big?n=1000", f"/big?n={BIG}"
        for url in (small, big):
            assert (await http.get(url)).status_code == 202
        await run_pending(app)
        await asyncio.sleep(0.1)  # subscribed to events by now: the near cache is in use
        for _ in range(3):
            for url in (small, big):
                assert (await http.get(url)).content == body_of(int(url.split("=")[1]))
        middleware = next(m for m in _middlewares(app))
        near = middleware._open().near
        assert near is not None
        assert len(near) == 1  # the small one only
        assert near.get(await digest_of(configured, small)) is not None


def _middlewares(app: Starlette) -> Iterator[WorkerMiddleware]:
    for node, _ in walk(app):
        if isinstance(node, WorkerMiddleware):
            yield node


async def _hit(app: ASGIApp, scope: Scope) -> tuple[int, int]:
    """GET straight through `app`, the body counted and dropped: (status, bytes)."""
    status, received = 0, 0

    async def receive() -> Message:
        await asyncio.Event().wait()  # the client stays: never a disconnect
        raise AssertionError

    async def send(message: Message) -> None:
        nonlocal status, received
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            received += len(message.get("body", b""))
        await asyncio.sleep(0)  # a client that reads as it comes: the hits interleave

    await app(dict(scope), receive, send)
    return status, received


@pytest.mark.parametrize("kind", ["inline"], indirect=True)
@pytest.mark.parametrize("site", [{"max_body_bytes": 64 * 1024 * 1024}], indirect=True)
async def test_concurrent_hits_of_a_big_body_hold_a_few_chunks_each(site: Site) -> None:
    size, hits = 32 * 1024 * 1024, 6
    url = f"/big?n={size}&mode=chunks"
    await site.ready(url)
    scope = await scope_of(url)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        served = await asyncio.gather(*(_hit(site.app, scope) for _ in range(hits)))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert served == [(200, size)] * hits
    # Stored whole, each hit would hold the body (and its reply) at once: 32 MiB and more.
    assert peak < hits * 4 * BODY_CHUNK, f"{peak / 2**20:.1f} MiB for {hits} hits"


async def test_the_body_key_is_in_its_entrys_cluster_slot(site: Site, kind: str) -> None:
    if site.redis is None:
        pytest.skip("memory:// has no keys")
    url = f"/big?n={BIG}"
    await site.ready(url)
    keys = RedisKeys(site.config.prefix)
    digest = await digest_of(site.config, url)
    body = await site.body_key(url)
    assert body is not None
    names = [keys.response(digest), keys.fresh(digest), keys.body_ref(digest), body]
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert all([await site.redis.exists(name) for name in names])
    if kind == "cluster":
        assert isinstance(site.redis, RedisCluster)
        nodes = {site.redis.get_node_from_key(name).name for name in names}
        assert len(nodes) == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"bytes=0-0", (0, 1)),
        (b"bytes=5-", (5, 100)),
        (b"bytes=5-1000", (5, 100)),
        (b"bytes=-10", (90, 100)),
        (b"bytes=-1000", (0, 100)),
        (b" Bytes = 1 - 2 ", (1, 3)),
        (b"bytes=0-1,3-4", None),  # several ranges: the whole body
        (b"bytes=3-1", None),
        (b"bytes=-", None),
        (b"bytes=a-b", None),
        (b"pages=1-2", None),
        (b"bytes=\xd9\xa1-2", None),  # a non-ASCII digit is no digit here
    ],
)
def test_byte_range_reads_one_range_of_rfc_9110(
    header: bytes, expected: tuple[int, int] | None
) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", [b"bytes=100-", b"bytes=-0", b"bytes=200-300"])
def test_byte_range_past_the_end_is_not_satisfiable(header: bytes) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        byte_range(header, 100)
