"""codec.py: versioned msgpack of stored responses and request snapshots."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_worker.codec import (
    Apart,
    CorruptEntryError,
    StoredResponse,
    decode_response,
    decode_snapshot,
    encode_response,
    encode_snapshot,
)
from asgi_worker.keys import RequestSnapshot

RESPONSE = StoredResponse(
    status=200,
    headers=((b"content-type", b"application/json"), (b"x-app", b"echo")),
    body=b'{"ok": true}',
    stored_at=1_700_000_000.25,
)
SNAPSHOT = RequestSnapshot(
    scheme="https",
    host="example.com:8443",
    root_path="/app",
    path="/r\u00e9port/\udce9",
    raw_path=b"/r%C3%A9port/%E9",
    query_string=b"a=1&b=%20",
    headers=((b"accept-language", b"de"), (b"x-tenant", b"7")),
)


def test_response_round_trip() -> None:
    data = encode_response(RESPONSE)
    assert isinstance(data, bytes)
    assert decode_response(data) == RESPONSE


def test_a_head_round_trip_names_its_body_and_holds_none_of_it() -> None:
    head = dataclasses.replace(RESPONSE, body=b"", apart=Apart("0123abcd", 5_000_000))
    data = encode_response(head)
    assert len(data) < 200
    assert decode_response(data) == head
    assert decode_response(data).length == 5_000_000


@pytest.mark.parametrize(
    ("version", "length"),
    [("", 1), ("../x", 1), ("ABC", 1), ("0" * 33, 1), (7, 1), ("ab", -1), ("ab", 1.5)],
)
def test_a_head_that_names_its_body_wrongly_is_corrupt(version: Any, length: Any) -> None:
    data = msgpack.packb([2, 200, [], 1.0, version, length], use_bin_type=True)
    with pytest.raises(CorruptEntryError):
        decode_response(data)


def test_snapshot_round_trip() -> None:
    again = decode_snapshot(encode_snapshot(SNAPSHOT))
    assert again == SNAPSHOT
    assert again.digest == SNAPSHOT.digest


def test_snapshot_round_trip_keeps_the_clients_address() -> None:
    snapshot = dataclasses.replace(SNAPSHOT, client=("203.0.113.7", 51234))
    assert decode_snapshot(encode_snapshot(snapshot)).client == ("203.0.113.7", 51234)


def test_a_version_2_snapshot_queued_before_the_upgrade_is_read_without_a_client() -> None:
    # What the release before wrote: version 2, no client item.
    data = packed([2, *SNAPSHOT.canonical(), b""])
    assert decode_snapshot(data) == SNAPSHOT


@pytest.mark.parametrize("client", [["h"], ["h", "80"], [b"h", 80], "h:80", ["h", 80, 1]], ids=str)
def test_a_client_of_the_wrong_shape_is_corrupt(client: Any) -> None:
    with pytest.raises(CorruptEntryError, match="client"):
        decode_snapshot(packed([3, *SNAPSHOT.canonical(), b"", client]))


def test_snapshot_round_trip_keeps_raw_path_none() -> None:
    snapshot = RequestSnapshot("http", "", "", "/", None, b"", ())
    assert decode_snapshot(encode_snapshot(snapshot)) == snapshot


def test_response_and_snapshot_are_not_interchangeable() -> None:
    with pytest.raises(CorruptEntryError):
        decode_response(encode_snapshot(SNAPSHOT))
    with pytest.raises(CorruptEntryError):
        decode_snapshot(encode_response(RESPONSE))


# --- properties: round trips -----------------------------------------------------------------

byte_pairs = st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=8)), max_size=4).map(
    tuple
)
responses = st.builds(
    StoredResponse,
    status=st.integers(100, 599),
    headers=byte_pairs,
    body=st.binary(max_size=256),
    stored_at=st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9),
)
any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
snapshots = st.builds(
    RequestSnapshot,
    scheme=st.sampled_from(["http", "https"]),
    host=st.text(st.characters(max_codepoint=255), max_size=20),
    root_path=any_text,
    path=any_text,
    raw_path=st.none() | st.binary(max_size=16),
    query_string=st.binary(max_size=64),
    headers=byte_pairs,
    client=st.none() | st.tuples(st.text(max_size=12), st.integers(0, 2**16)),
)


@given(responses)
def test_property_response_round_trip(response: StoredResponse) -> None:
    assert decode_response(encode_response(response)) == response


@given(snapshots)
def test_property_snapshot_round_trip(snapshot: RequestSnapshot) -> None:
    again = decode_snapshot(encode_snapshot(snapshot))
    assert again == snapshot
    assert again.digest == snapshot.digest


# --- corrupt and foreign bytes ---------------------------------------------------------------

DECODERS: list[Callable[[bytes], Any]] = [decode_response, decode_snapshot]


def packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


VALID_RESPONSE = encode_response(RESPONSE)
VALID_SNAPSHOT = encode_snapshot(SNAPSHOT)

CORRUPT_RESPONSES = {
    "empty": b"",
    "garbage": b"\xc1\xff\x00garbage",
    "text": b"HTTP/1.1 200 OK\r\n\r\nhello",
    "pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    "json": b'{"status": 200}',
    "msgpack-int": packed(200),
    "msgpack-map": packed({"status": 200, "body": b""}),
    "msgpack-int-keys": b"\x81\x01\x02",
    "wrong-version": packed([2, 200, [], b"", 1.0]),
    "no-version": packed([200, [], b"", 1.0]),
    "too-long": packed([1, 200, [], b"", 1.0, "extra"]),
    "status-str": packed([1, "200", [], b"", 1.0]),
    "status-low": packed([1, 99, [], b"", 1.0]),
    "status-high": packed([1, 1000, [], b"", 1.0]),
    "body-str": packed([1, 200, [], "text", 1.0]),
    "stored-at-str": packed([1, 200, [], b"", "now"]),
    "headers-map": packed([1, 200, {"a": b"b"}, b"", 1.0]),
    "header-triple": packed([1, 200, [[b"a", b"b", b"c"]], b"", 1.0]),
    "header-str": packed([1, 200, [["a", "b"]], b"", 1.0]),
    "truncated": VALID_RESPONSE[:-3],
    "truncated-half": VALID_RESPONSE[: len(VALID_RESPONSE) // 2],
    "trailing": VALID_RESPONSE + b"\x00",
    "invalid-utf8": b"\x95\x01\xa2\xff\xfe\x90\xc4\x00\xcb" + b"\x00" * 8,
    "nested": b"\x91" * 100_000,
}


@pytest.mark.parametrize("data", CORRUPT_RESPONSES.values(), ids=CORRUPT_RESPONSES.keys())
def test_corrupt_response_raises_corrupt_entry_error(data: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        decode_response(data)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_stored_at_is_corrupt(value: float) -> None:
    # encode_response never writes one, and serving it computes int(now - stored_at) for
    # Age, which raises ValueError/OverflowError in the middleware instead of a miss.
    with pytest.raises(CorruptEntryError):
        decode_response(packed([1, 200, [], b"", value]))


CORRUPT_SNAPSHOTS = {
    "empty": b"",
    "garbage": b"\xc1garbage",
    "msgpack-str": packed("GET /"),
    "wrong-version": packed([2, *SNAPSHOT.canonical()]),
    "too-short": packed([1, *SNAPSHOT.canonical()[:-1]]),
    "scheme-bytes": packed([1, b"https", *SNAPSHOT.canonical()[1:]]),
    "path-str": packed([1, "https", "h", b"", "/", None, b"", []]),
    "raw-path-str": packed([1, "https", "h", b"", b"/", "/", b"", []]),
    "query-str": packed([1, "https", "h", b"", b"/", None, "a=1", []]),
    "headers-tuple-of-one": packed([1, "https", "h", b"", b"/", None, b"", [[b"a"]]]),
    "path-not-utf8": packed([1, "https", "h", b"", b"/\xff", None, b"", []]),
    "truncated": VALID_SNAPSHOT[:-2],
    "a-response": VALID_RESPONSE,
}


@pytest.mark.parametrize("data", CORRUPT_SNAPSHOTS.values(), ids=CORRUPT_SNAPSHOTS.keys())
def test_corrupt_snapshot_raises_corrupt_entry_error(data: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        decode_snapshot(data)


@pytest.mark.parametrize("cut", range(len(VALID_RESPONSE)))
def test_every_truncation_of_a_response_is_corrupt(cut: int) -> None:
    with pytest.raises(CorruptEntryError):
        decode_response(VALID_RESPONSE[:cut])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


def well_typed_headers(headers: Any) -> bool:
    return isinstance(headers, list | tuple) and all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(part, bytes) for part in pair)
        for pair in headers
    )


def only_corrupt_or_valid(decode: Callable[[bytes], Any], data: bytes) -> None:
    """Decoding foreign bytes raises CorruptEntryError or gives a well-typed value."""
    try:
        value = decode(data)
    except CorruptEntryError:
        return
    if decode is decode_response:
        assert isinstance(value, StoredResponse)
        assert type(value.status) is int
        assert 100 <= value.status <= 999
        assert isinstance(value.body, bytes)
        assert isinstance(value.stored_at, float)
        assert well_typed_headers(value.headers)
    else:
        assert isinstance(value, RequestSnapshot)
        assert decode_snapshot(encode_snapshot(value)) == value


@pytest.mark.parametrize("decode", DECODERS, ids=["response", "snapshot"])
@given(data=st.binary(max_size=64))
def test_property_random_bytes_only_raise_corrupt_entry_error(
    decode: Callable[[bytes], Any], data: bytes
) -> None:
    only_corrupt_or_valid(decode, data)


@pytest.mark.parametrize("decode", DECODERS, ids=["response", "snapshot"])
@given(value=msgpack_values)
def test_property_msgpack_of_any_shape_only_raises_corrupt_entry_error(
    decode: Callable[[bytes], Any], value: Any
) -> None:
    only_corrupt_or_valid(decode, packed(value))


@given(st.lists(msgpack_values, min_size=4, max_size=4))
def test_property_versioned_response_with_wrong_fields_is_corrupt(fields: list[Any]) -> None:
    status, headers, body, stored_at = fields
    well_typed = (
        type(status) is int
        and 100 <= status <= 999
        and isinstance(body, bytes)
        and well_typed_headers(headers)
        and isinstance(stored_at, int | float)
    )
    data = packed([1, *fields])
    if well_typed:
        assert decode_response(data).status == status
    else:
        with pytest.raises(CorruptEntryError):
            decode_response(data)


@given(st.lists(msgpack_values, min_size=7, max_size=7))
def test_property_versioned_snapshot_with_wrong_fields_is_corrupt(fields: list[Any]) -> None:
    only_corrupt_or_valid(decode_snapshot, packed([1, *fields]))


@given(responses, st.data())
def test_property_truncated_response_is_corrupt(
    response: StoredResponse, data: st.DataObject
) -> None:
    encoded = encode_response(response)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(CorruptEntryError):
        decode_response(encoded[:cut])
