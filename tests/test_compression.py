"""Compression: a compressible answer stored gzipped once, served as gzip or decoded.

The rules (core/encodings.py, core/representations.py) on their own, then through the
middleware on every backend, real Redis and `memory://`.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgpack
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from asgi_worker import Config, WorkerMiddleware
from asgi_worker.core.codec import Coded, CorruptEntryError, StoredResponse, decode_response
from asgi_worker.core.codec import encode_response as encode
from asgi_worker.core.encodings import (
    accepts_gzip,
    app_gzip,
    compressible,
    gunzip,
    tagged,
    with_vary,
)
from asgi_worker.core.representations import for_storing, select
from asgi_worker.testing import run_pending
from asgi_worker.web.decoded_bodies import DecodedBodies

from .helpers import backend_config, digest_of, response_key, serve

HIT = "asgi-worker; hit"

# A report as an app would send it: JSON rows, about 120 KB, about 10 % of it gzipped.
REPORT = json.dumps(
    [{"id": n, "name": f"item {n}", "price": n * 1.25, "tags": ["a", "b"]} for n in range(1800)]
).encode()
SMALL = b'{"ok": true}'
NOISE = os.urandom(8000)  # text/plain that gzip cannot shrink


# ----------------------------------------------------------------- the rules alone


@pytest.mark.parametrize(
    ("values", "accepted"),
    [
        ([], False),  # no header: identity only, as Varnish, nginx and Apache take it
        ([b""], False),
        ([b"gzip"], True),
        ([b"GZip"], True),
        ([b"x-gzip"], True),
        ([b"gzip, deflate, br"], True),
        ([b"br", b"gzip"], True),  # several headers
        ([b"br;q=1.0, gzip;q=0.5"], True),
        ([b"gzip;q=0"], False),
        ([b"gzip;q=0.000"], False),
        ([b"gzip ; q=0.001"], True),
        ([b"*"], True),
        ([b"*;q=0"], False),
        ([b"*, gzip;q=0"], False),  # the named refusal wins over *
        ([b"gzip;q=0, *"], False),
        ([b"identity"], False),
        ([b"identity;q=0, *;q=0"], False),
        ([b"br, deflate"], False),
        ([b"gzip;q=nonsense"], False),  # an entry whose q is no number is ignored
        ([b"gzip;q=2"], False),
        ([b", ,gzip"], True),
    ],
)
def test_accept_encoding_is_read_as_rfc_9110_says(values: list[bytes], accepted: bool) -> None:
    assert accepts_gzip(values) is accepted


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/json", True),
        (b"application/json; charset=utf-8", True),
        (b"Text/HTML", True),
        (b"application/problem+json", True),
        (b"application/atom+xml", True),
        (b"image/svg+xml", True),
        (b"application/javascript", True),
        (b"image/png", False),
        (b"application/octet-stream", False),
        (b"application/zip", False),
    ],
)
def test_compressible_types(content_type: bytes, expected: bool) -> None:
    assert compressible(((b"content-type", content_type),)) is expected


def test_an_answer_coded_ranged_or_no_transform_is_not_compressible() -> None:
    json_type = (b"content-type", b"application/json")
    assert not compressible((json_type, (b"content-encoding", b"br")))
    assert not compressible((json_type, (b"content-range", b"bytes 0-1/2")))
    assert not compressible((json_type, (b"cache-control", b"max-age=9, No-Transform")))
    assert not compressible(())  # no type: not known to be text


def test_app_gzip_is_gzip_alone() -> None:
    assert app_gzip(((b"content-encoding", b"gzip"),))
    assert app_gzip(((b"content-encoding", b"X-Gzip"),))
    assert not app_gzip(((b"content-encoding", b"br"),))
    assert not app_gzip(((b"content-encoding", b"gzip, br"),))
    assert not app_gzip(())


def test_tags_of_another_representation() -> None:
    assert tagged(b'"abc"', "gzip") == b'"abc-gzip"'
    assert tagged(b'W/"abc"', "gzip") == b'W/"abc-gzip"'
    assert tagged(b"bare", "gzip") == b"bare-gzip"  # not a valid tag: still a distinct one


def test_vary_is_merged() -> None:
    assert with_vary(()) == ((b"vary", b"Accept-Encoding"),)
    assert with_vary(((b"vary", b"Accept"),)) == ((b"vary", b"Accept, Accept-Encoding"),)
    kept = ((b"vary", b"accept-encoding, Accept"),)
    assert with_vary(kept) == kept


def test_gunzip_refuses_what_is_not_one_whole_member() -> None:
    coded = gzip.compress(REPORT)
    assert gunzip(coded, len(REPORT)) == REPORT
    for bad in (b"", b"not gzip", coded[:-5], coded + b"x", coded + coded):
        with pytest.raises(ValueError):
            gunzip(bad, len(REPORT))
    with pytest.raises(ValueError, match="more than"):
        gunzip(coded, len(REPORT) - 1)  # a bomb is cut off at the limit


def stored_response(
    body: bytes, content_type: bytes = b"application/json", **more: bytes
) -> StoredResponse:
    headers = (
        (b"content-type", content_type),
        (b"etag", b'"e1"'),
        (b"content-length", b"%d" % len(body)),
        *((name.replace("_", "-").encode(), value) for name, value in more.items()),
    )
    return StoredResponse(status=200, headers=headers, body=body, stored_at=1.0)


def store(response: StoredResponse) -> StoredResponse:
    return for_storing(response, min_bytes=1024, limit=10 * 1024 * 1024, level=9)


def test_what_is_stored_as_the_app_sent_it() -> None:
    for response in (
        stored_response(SMALL),  # under compress_min_bytes
        stored_response(REPORT, b"image/png"),  # a type that is compressed already
        stored_response(NOISE, b"text/plain"),  # gzip would not save 10 %
        stored_response(REPORT, content_encoding=b"br"),  # the app's own coding
        stored_response(REPORT, cache_control=b"no-transform"),
        stored_response(gzip.compress(REPORT)[:-9], content_encoding=b"gzip"),  # bad gzip
    ):
        assert store(response) is response


def test_the_threshold_is_exclusive() -> None:
    """1 KiB (one packet either way, the main benchmark's body) is stored as sent."""
    at, above = (json.dumps({"pad": "x" * (size - 11)}).encode() for size in (1024, 1025))
    assert (len(at), len(above)) == (1024, 1025)
    assert store(stored_response(at)).coded is None
    assert store(stored_response(above)).coded is not None


def test_a_report_is_stored_gzipped_once_and_served_both_ways() -> None:
    response = store(stored_response(REPORT, vary=b"Accept"))
    assert response.coded == Coded("gzip", len(REPORT), by_cache=True)
    assert len(response.body) < len(REPORT) * 0.2
    assert decode_response(encode(response)) == response
    as_gzip = select(response, accepts_gzip=True)
    assert gzip.decompress(as_gzip.body) == REPORT
    headers = dict(as_gzip.headers)
    assert headers[b"content-encoding"] == b"gzip"
    assert headers[b"content-length"] == b"%d" % len(as_gzip.body)
    assert headers[b"etag"] == b'"e1-gzip"'
    assert headers[b"vary"] == b"Accept, Accept-Encoding"
    as_identity = select(response, accepts_gzip=False)
    assert as_identity.body == REPORT
    headers = dict(as_identity.headers)
    assert b"content-encoding" not in headers
    assert (headers[b"content-length"], headers[b"etag"]) == (b"%d" % len(REPORT), b'"e1"')
    assert headers[b"vary"] == b"Accept, Accept-Encoding"


def test_an_app_gzip_answer_is_kept_and_decoded_for_identity_clients() -> None:
    coded = gzip.compress(REPORT)
    response = store(stored_response(coded, content_encoding=b"gzip"))
    assert response.coded == Coded("gzip", len(REPORT), by_cache=False)
    as_gzip = select(response, accepts_gzip=True)
    assert as_gzip.body == coded  # the app's bytes, untouched
    assert dict(as_gzip.headers)[b"etag"] == b'"e1"'
    as_identity = select(response, accepts_gzip=False)
    assert as_identity.body == REPORT
    headers = dict(as_identity.headers)
    assert b"content-encoding" not in headers
    assert headers[b"content-length"] == b"%d" % len(REPORT)
    assert headers[b"etag"] == b'"e1-identity"'
    assert headers[b"vary"] == b"Accept-Encoding"


def test_a_corrupt_stored_gzip_is_a_corrupt_entry() -> None:
    good = store(stored_response(REPORT))
    for body in (good.body[:-20], b"\x1f\x8b garbage", gzip.compress(REPORT + b" ")):
        with pytest.raises(CorruptEntryError):
            select(StoredResponse(200, good.headers, body, 1.0, coded=good.coded), False)


def test_version_1_entries_are_still_read() -> None:
    # As the release before wrote them: no coding field.
    old = msgpack.packb(
        [1, 200, [[b"content-type", b"application/json"]], REPORT, 1.5, False], use_bin_type=True
    )
    response = decode_response(old)
    assert (response.body, response.coded) == (REPORT, None)
    assert select(response, accepts_gzip=True) is response
    assert encode(response) == old  # an uncoded entry is still written as version 1


@pytest.mark.parametrize(
    "fields",
    [["br", 10, True], ["gzip", -1, True], ["gzip", 1.5, True], ["gzip", 10, 1], [["x"], 1, True]],
)
def test_a_coded_entry_with_bad_fields_is_corrupt(fields: list[object]) -> None:
    data = msgpack.packb([3, 200, [], b"x", 1.5, *fields], use_bin_type=True)
    with pytest.raises(CorruptEntryError):
        decode_response(data)


# ------------------------------------------------------------ through the middleware


def report_app(config: Config, *, inside: bool = False) -> Starlette:
    """/report (120 KB JSON), /small, /noise, /png, /own (the app's own br), /vary."""

    async def report(request: Request) -> Response:
        return Response(REPORT, media_type="application/json")

    async def small(request: Request) -> Response:
        return Response(SMALL, media_type="application/json")

    async def noise(request: Request) -> Response:
        return Response(NOISE, media_type="text/plain")

    async def png(request: Request) -> Response:
        return Response(REPORT, media_type="image/png")

    async def own(request: Request) -> Response:
        headers = {"content-encoding": "br"}
        return Response(b"not really br " * 200, media_type="text/plain", headers=headers)

    async def varied(request: Request) -> Response:
        return Response(REPORT, media_type="application/json", headers={"vary": "Accept"})

    app = Starlette(
        routes=[
            Route("/report", report),
            Route("/small", small),
            Route("/noise", noise),
            Route("/png", png),
            Route("/own", own),
            Route("/vary", varied),
        ]
    )
    if inside:  # the app compresses itself, inside the cache
        app.add_middleware(GZipMiddleware, minimum_size=500)
    app.add_middleware(WorkerMiddleware, config=config)
    return app


@dataclass
class Site:
    app: Starlette
    http: httpx.AsyncClient

    async def get(
        self, url: str, encoding: str | None, method: str = "GET", **headers: str
    ) -> tuple[httpx.Response, bytes]:
        """A request with this `Accept-Encoding` (None: none at all); the raw body too."""
        request = self.http.build_request(method, url, headers=_named(headers))
        del request.headers["accept-encoding"]  # httpx's own
        if encoding is not None:
            request.headers["accept-encoding"] = encoding
        response = await self.http.send(request, stream=True)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
        return response, raw

    async def ready(self, url: str) -> None:
        assert (await self.http.get(url)).status_code == 202
        await run_pending(self.app)
        response, _ = await self.get(url, "gzip")
        assert response.headers["cache-status"] == HIT


def _named(headers: dict[str, str]) -> dict[str, str]:
    return {name.replace("_", "-"): value for name, value in headers.items()}


async def open_site(kind: str, config: Config, **changes: object) -> AsyncIterator[Site]:
    inside = bool(changes.pop("inside", False))
    app = report_app(backend_config(kind, config, **changes), inside=inside)
    async with serve(app) as http:
        yield Site(app, http)


@pytest.fixture
async def site(kind: str, config: Config) -> AsyncIterator[Site]:
    async for value in open_site(kind, config):
        yield value


async def test_a_gzip_client_gets_the_stored_gzip(site: Site) -> None:
    await site.ready("/report")
    response, raw = await site.get("/report", "gzip, deflate, br")
    assert response.status_code == 200
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw) < len(REPORT) * 0.2
    assert gzip.decompress(raw) == REPORT
    assert response.headers["vary"] == "Accept-Encoding"


@pytest.mark.parametrize(
    "encoding", [None, "", "identity", "gzip;q=0", "br", "identity;q=0, *;q=0"]
)
async def test_a_client_that_accepts_no_gzip_gets_the_apps_bytes(
    site: Site, encoding: str | None
) -> None:
    await site.ready("/report")
    response, raw = await site.get("/report", encoding)
    assert response.status_code == 200
    assert raw == REPORT
    assert "content-encoding" not in response.headers
    assert response.headers["content-length"] == str(len(REPORT))
    assert response.headers["vary"] == "Accept-Encoding"


async def test_each_representation_has_its_etag_and_its_304(site: Site) -> None:
    await site.ready("/report")
    zipped, _ = await site.get("/report", "gzip")
    plain, _ = await site.get("/report", "identity")
    assert zipped.headers["etag"] == plain.headers["etag"][:-1] + '-gzip"'
    for encoding, tag in (("gzip", zipped.headers["etag"]), ("identity", plain.headers["etag"])):
        response, raw = await site.get("/report", encoding, if_none_match=tag)
        assert (response.status_code, raw) == (304, b"")
        assert response.headers["etag"] == tag
        assert response.headers["vary"] == "Accept-Encoding"
    # The other representation's tag names bytes this client would not get: a 200.
    crossed, raw = await site.get("/report", "gzip", if_none_match=plain.headers["etag"])
    assert crossed.status_code == 200
    assert gzip.decompress(raw) == REPORT


async def test_ranges_apply_to_the_representation_sent(site: Site) -> None:
    await site.ready("/report")
    whole, stored_gzip = await site.get("/report", "gzip")
    part, raw = await site.get("/report", "gzip", range="bytes=10-99")
    assert part.status_code == 206
    assert raw == stored_gzip[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(stored_gzip)}"
    assert part.headers["content-encoding"] == "gzip"
    part, raw = await site.get("/report", "identity", range="bytes=-50")
    assert (part.status_code, raw) == (206, REPORT[-50:])
    assert (
        part.headers["content-range"] == f"bytes {len(REPORT) - 50}-{len(REPORT) - 1}/{len(REPORT)}"
    )
    # If-Range compares with the representation's own strong tag.
    tag = whole.headers["etag"]
    part, _ = await site.get("/report", "gzip", range="bytes=0-9", if_range=tag)
    assert part.status_code == 206
    part, _ = await site.get("/report", "identity", range="bytes=0-9", if_range=tag)
    assert part.status_code == 200


async def test_head_gets_the_headers_of_its_representation(site: Site) -> None:
    await site.ready("/report")
    got, stored_gzip = await site.get("/report", "gzip")
    for encoding, length in (("gzip", len(stored_gzip)), ("identity", len(REPORT))):
        head, raw = await site.get("/report", encoding, method="HEAD")
        assert (head.status_code, raw) == (200, b"")
        assert head.headers["content-length"] == str(length)
        assert head.headers.get("content-encoding") == ("gzip" if encoding == "gzip" else None)
    assert (
        got.headers["etag"] == (await site.get("/report", "gzip", method="HEAD"))[0].headers["etag"]
    )


@pytest.mark.parametrize("path", ["/small", "/noise", "/png"])
async def test_small_incompressible_and_binary_bodies_are_served_as_sent(
    site: Site, path: str
) -> None:
    await site.ready(path)
    expected = {"/small": SMALL, "/noise": NOISE, "/png": REPORT}[path]
    for encoding in ("gzip", None):
        response, raw = await site.get(path, encoding)
        assert raw == expected
        assert "content-encoding" not in response.headers
        assert "vary" not in response.headers


async def test_an_app_coding_of_its_own_is_left_alone(site: Site) -> None:
    await site.ready("/own")
    for encoding in ("br", None):  # br the cache cannot decode: as the app sent it
        response, raw = await site.get("/own", encoding)
        assert response.headers["content-encoding"] == "br"
        assert raw == b"not really br " * 200


async def test_the_apps_vary_is_kept_and_merged(site: Site) -> None:
    await site.ready("/vary")
    response, _ = await site.get("/vary", "gzip")
    assert response.headers["vary"] == "Accept, Accept-Encoding"


async def test_compress_off_stores_as_the_app_sent_it(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, compress=False):
        await site.ready("/report")
        response, raw = await site.get("/report", "gzip")
        assert raw == REPORT
        assert "content-encoding" not in response.headers


@pytest.mark.parametrize("vary", [(), ("accept-encoding",)])
async def test_gzip_middleware_inside_the_cache(
    kind: str, config: Config, vary: tuple[str, ...]
) -> None:
    """The app compresses itself. Unkeyed, its replay carries no `Accept-Encoding`, so it
    answers identity and the cache compresses; keyed, each coding has its entry. Either
    way a client that accepts no gzip gets none."""
    async for site in open_site(kind, config, inside=True, vary=vary):
        for encoding in ("gzip", None):
            response, _ = await site.get("/report", encoding)
            if response.status_code == 202:
                await run_pending(site.app)
            response, raw = await site.get("/report", encoding)
            assert response.headers["cache-status"] == HIT
            if encoding == "gzip":
                assert response.headers["content-encoding"] == "gzip"
                assert gzip.decompress(raw) == REPORT
            else:
                assert "content-encoding" not in response.headers
                assert raw == REPORT


async def test_gzip_middleware_outside_the_cache(kind: str, config: Config) -> None:
    """Outside, GZipMiddleware sees a response coded already and passes it on; to a
    client that accepts no gzip the cache sends identity, which it leaves as it is."""
    app = Starlette(
        routes=[Route("/report", lambda request: Response(REPORT, media_type="application/json"))]
    )
    app.add_middleware(WorkerMiddleware, config=backend_config(kind, config))
    app.add_middleware(GZipMiddleware, minimum_size=500)
    async with serve(app) as http:
        site = Site(app, http)
        await site.ready("/report")
        response, raw = await site.get("/report", "gzip")
        assert response.headers["content-encoding"] == "gzip"
        assert gzip.decompress(raw) == REPORT  # coded once, by the cache, not twice
        response, raw = await site.get("/report", None)
        assert raw == REPORT


async def test_an_app_that_gzips_whatever_is_asked_is_decoded_for_identity(
    kind: str, config: Config
) -> None:
    coded = gzip.compress(REPORT)

    async def always(request: Request) -> Response:
        headers = {"content-encoding": "gzip", "etag": '"app"'}
        return Response(coded, media_type="application/json", headers=headers)

    app = Starlette(routes=[Route("/report", always)])
    app.add_middleware(WorkerMiddleware, config=backend_config(kind, config))
    async with serve(app) as http:
        site = Site(app, http)
        await site.ready("/report")
        response, raw = await site.get("/report", "gzip")
        assert (raw, response.headers["etag"]) == (coded, '"app"')
        response, raw = await site.get("/report", None)
        assert raw == REPORT
        assert "content-encoding" not in response.headers
        assert response.headers["etag"] == '"app-identity"'


async def test_a_corrupt_gzip_entry_is_discarded_and_a_miss(config: Config, redis: Redis) -> None:
    async for site in open_site("inline", config):
        await site.ready("/report")
        key = response_key(config, await digest_of(config, "/report"))
        entry = decode_response(await redis.get(key))
        broken = StoredResponse(
            200, entry.headers, entry.body[:-30], entry.stored_at, coded=entry.coded
        )
        # Its frame is checked (gzip's magic, and the length in its trailer) before a
        # gzip client gets it; an identity client's decoding checks everything.
        for encoding in ("gzip", None):
            await redis.set(key, encode(broken), px=await redis.pttl(key))
            response, raw = await site.get("/report", encoding)
            assert response.status_code == 202
            await run_pending(site.app)
        await run_pending(site.app)
        response, raw = await site.get("/report", None)
        assert (response.status_code, raw) == (200, REPORT)


async def test_an_entry_stored_before_compression_is_still_served(
    config: Config, redis: Redis
) -> None:
    async for site in open_site("inline", config, compress=False):
        await site.ready("/report")  # stored as version 1, as releases before stored it
    async for site in open_site("inline", config):
        response, raw = await site.get("/report", "gzip")
        assert response.headers["cache-status"] == HIT
        assert raw == REPORT
        assert "content-encoding" not in response.headers


def test_decoded_bodies_are_kept_per_content_never_across_commits() -> None:
    bodies = DecodedBodies(max_bytes=4 * 1024 * 1024)
    first = store(stored_response(REPORT))
    once = bodies.select("d1", first, accepts_gzip=False)
    again = bodies.select("d1", first, accepts_gzip=False)
    assert once.body == REPORT
    assert again.body is once.body  # decoded once
    newer = store(stored_response(REPORT.replace(b"item 1", b"item X")))
    assert bodies.select("d1", newer, accepts_gzip=False).body == gzip.decompress(newer.body)
    assert bodies.select("d1", first, accepts_gzip=True).body == first.body  # gzip as stored


async def test_identity_hits_without_kept_bodies(kind: str, config: Config) -> None:
    async for site in open_site(kind, config, decoded_bodies_bytes=0):
        await site.ready("/report")
        for _ in range(2):
            response, raw = await site.get("/report", None)
            assert (response.headers["cache-status"], raw) == (HIT, REPORT)
