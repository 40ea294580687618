"""The near cache's byte bound is the memory it holds, and expired entries leave unread."""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable

import pytest

from asgi_worker.core.codec import Coded, StoredResponse, decode_response, encode_response
from asgi_worker.web import near_cache as near_module
from asgi_worker.web.near_cache import NearCache, response_cost

MAX_BYTES = 4 * 1024 * 1024


def decoded(
    number: int, body_size: int, status: int = 200, coded: Coded | None = None
) -> StoredResponse:
    """A response as the middleware puts it: decoded from Redis, every part its own."""
    body = (b"%019d" % number * (body_size // 19 + 1))[:body_size]
    headers = (
        (b"content-length", str(body_size).encode()),
        (b"content-type", b"application/json"),
        (b"cache-control", b"public, max-age=60"),
        (b"etag", b'W/"%d"' % number),
    )
    stored = StoredResponse(
        status=status, headers=headers, body=body, stored_at=time.time(), coded=coded
    )
    return decode_response(encode_response(stored))


def traced(build: Callable[[], object]) -> tuple[int, object]:
    """What `build()` returns, and the bytes it holds by tracemalloc (temporaries freed)."""
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, built
    finally:
        tracemalloc.stop()


def filled(body_size: int, *, measured: bool) -> NearCache[StoredResponse]:
    """A cache of MAX_BYTES after twice as many puts as it holds (eviction in its stride)."""
    near: NearCache[StoredResponse] = NearCache(
        ttl=3600, max_bytes=MAX_BYTES, cost=response_cost if measured else None
    )
    number = most = 0
    while number < 2 * most or number < 100:
        response = decoded(number, body_size)
        near.put(f"{number:032x}", response, len(response.body))
        number, most = number + 1, max(most, len(near))
    return near


@pytest.mark.parametrize("body_size", [10, 1024])
def test_the_bound_is_the_memory_the_cache_holds(body_size: int) -> None:
    held, near = traced(lambda: filled(body_size, measured=True))
    assert isinstance(near, NearCache)
    assert near.nbytes <= MAX_BYTES
    assert held <= near.nbytes  # the charge covers all Python asked for
    assert 0.75 * MAX_BYTES <= held <= 1.25 * MAX_BYTES, held / MAX_BYTES


@pytest.mark.parametrize("body_size", [10, 1024])
def test_charging_the_body_alone_breaks_the_bound(body_size: int) -> None:
    """The measurement above does catch the old accounting (about 256 B plus the body)."""
    held, near = traced(lambda: filled(body_size, measured=False))
    assert isinstance(near, NearCache)
    assert held > 1.25 * MAX_BYTES, held / MAX_BYTES


@pytest.mark.parametrize(
    ("body_size", "status"), [(0, 200), (1, 200), (10, 404), (1024, 200), (100_000, 200)]
)
def test_response_cost_is_what_a_decoded_response_holds(body_size: int, status: int) -> None:
    data = encode_response(decoded(7, body_size, status))
    held, response = traced(lambda: decode_response(data))
    assert isinstance(response, StoredResponse)
    objects = 4 + 3 * len(response.headers) + 1  # pymalloc rounds each up to 16 bytes
    assert held <= response_cost(response) <= held + 16 * objects


def test_response_cost_counts_a_gzip_bodys_coding() -> None:
    coded = Coded("gzip", 123_456_789, by_cache=True)  # a length past the shared small ints
    data = encode_response(decoded(7, 1024, coded=coded))
    held, response = traced(lambda: decode_response(data))
    assert isinstance(response, StoredResponse)
    assert response.coded == coded
    objects = 4 + 3 * len(response.headers) + 1 + 3
    assert held <= response_cost(response) <= held + 16 * objects


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(near_module, "monotonic", clock)
    return clock


def responses_cache(count: int, ttl: float = 0.1) -> NearCache[StoredResponse]:
    near: NearCache[StoredResponse] = NearCache(
        ttl=ttl, max_bytes=64 * 1024 * 1024, cost=response_cost
    )
    for number in range(count):
        near.put(f"{number:032x}", decoded(number, 100))
    return near


def test_expired_entries_leave_on_misses_without_being_read(clock: Clock) -> None:
    near = responses_cache(200)
    empty = NearCache[StoredResponse](ttl=0.1, max_bytes=1).nbytes
    assert near.nbytes > 200 * 500
    clock.now += 0.05
    assert near.get("not there") is None
    assert len(near) == 200  # nothing before its time
    clock.now += 0.06
    assert near.get("not there") is None
    assert 0 < len(near) < 200  # bounded work per call
    for _ in range(10):
        near.get("not there")
    assert len(near) == 0
    assert near.nbytes == empty  # the table is given back too


def test_expired_entries_leave_on_puts(clock: Clock) -> None:
    near = responses_cache(100)
    full = near.nbytes
    clock.now += 0.2
    for number in range(5):
        near.put(f"new{number}", decoded(number, 100))
    assert len(near) == 5
    assert near.nbytes < full / 10  # the table stays sized for 100 until it next resizes


def test_a_recently_used_expired_entry_leaves_within_one_more_ttl(clock: Clock) -> None:
    near = responses_cache(1)  # "0...0", expires at 1000.1
    clock.now += 0.05
    near.put("b", decoded(1, 100))  # expires at 1000.15
    clock.now += 0.04
    assert near.get("0" * 32) is not None  # used: now behind "b"
    clock.now += 0.03  # it expired, "b" has not
    near.get("not there")
    assert len(near) == 2
    clock.now += 0.04  # "b" too: both go, the first without being read again
    near.get("not there")
    assert len(near) == 0


def test_expired_entries_leave_in_real_time() -> None:
    near = responses_cache(20, ttl=0.01)
    time.sleep(0.02)
    near.get("not there")
    assert len(near) == 0


def test_a_cache_with_a_cost_measures_values_itself() -> None:
    response = decoded(1, 1000)
    told: NearCache[StoredResponse] = NearCache(ttl=1, max_bytes=10**6)
    told.put("a", response, response_cost(response))
    measured: NearCache[StoredResponse] = NearCache(ttl=1, max_bytes=10**6, cost=response_cost)
    measured.put("a", response, 1)  # the size is ignored
    assert measured.nbytes == told.nbytes
    with pytest.raises(TypeError):
        told.put("b", response)
