"""keys.py: the request snapshot, its digest, and the Redis key names. No I/O."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from asgi_worker.core.codec import decode_snapshot, encode_snapshot
from asgi_worker.core.keys import (
    RedisKeys,
    RequestSnapshot,
    path_tag,
    scope_client,
    snapshot_from_scope,
)

HEX32 = re.compile(r"^[0-9a-f]{32}$")


def scope(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "scheme": "https",
        "server": ("10.0.0.1", 8000),
        "root_path": "",
        "path": "/report",
        "raw_path": b"/report",
        "query_string": b"year=2024",
        "headers": [
            (b"host", b"example.com"),
            (b"accept-language", b"de"),
            (b"user-agent", b"curl/8"),
        ],
    }
    base.update(changes)
    return base


VARY = ("accept-language",)


def digest(**changes: Any) -> str:
    return snapshot_from_scope(scope(**changes), VARY).digest


def test_same_request_same_key() -> None:
    first = snapshot_from_scope(scope(), VARY)
    second = snapshot_from_scope(scope(), VARY)
    assert first == second
    assert first.digest == second.digest
    assert HEX32.match(first.digest)


def test_snapshot_holds_only_keyed_parts() -> None:
    snapshot = snapshot_from_scope(scope(), VARY)
    assert snapshot == RequestSnapshot(
        scheme="https",
        host="example.com",
        root_path="",
        path="/report",
        raw_path=b"/report",
        query_string=b"year=2024",
        headers=((b"accept-language", b"de"),),
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"scheme": "http"},
        {"headers": [(b"host", b"example.org"), (b"accept-language", b"de")]},
        {"path": "/other", "raw_path": b"/other"},
        {"path": "/Report"},
        {"root_path": "/app"},
        {"raw_path": b"/re%2Fport"},  # %72 would be "r": the same path (RFC 3986)
        {"raw_path": None},
        {"query_string": b"year=2025"},
        {"query_string": b""},
        {"headers": [(b"host", b"example.com"), (b"accept-language", b"fr")]},
        {"headers": [(b"host", b"example.com")]},
        {"headers": [(b"host", b"example.com"), (b"accept-language", b"")]},
    ],
    ids=[
        "scheme",
        "host",
        "path",
        "path-case",
        "root_path",
        "raw_path",
        "raw_path-none",
        "query",
        "query-empty",
        "vary-value",
        "vary-missing",
        "vary-empty",
    ],
)
def test_each_keyed_difference_changes_the_digest(changes: dict[str, Any]) -> None:
    assert digest(**changes) != digest()


def test_head_and_get_share_a_key() -> None:
    assert digest(method="HEAD") == digest(method="GET")


def test_root_path_and_path_are_not_merely_concatenated() -> None:
    assert digest(root_path="/a", path="/b") != digest(root_path="", path="/a/b")
    assert digest(root_path="/a", path="/b") != digest(root_path="/a/b", path="")


@pytest.mark.parametrize(
    "extra",
    [
        (b"x-forwarded-host", b"evil.example"),
        (b"x-forwarded-proto", b"http"),
        (b"user-agent", b"other/1"),
        (b"cookie", b"session=abc"),
        (b"authorization", b"Bearer t"),
        (b"accept-encoding", b"gzip"),
    ],
    ids=lambda pair: pair[0].decode(),
)
def test_unkeyed_headers_make_no_difference(extra: tuple[bytes, bytes]) -> None:
    plain = scope()
    with_extra = scope(headers=[*plain["headers"], extra])
    assert snapshot_from_scope(with_extra, VARY) == snapshot_from_scope(plain, VARY)
    assert snapshot_from_scope(with_extra, VARY).digest == digest()


def test_unkeyed_header_values_make_no_difference() -> None:
    assert digest(
        headers=[(b"host", b"example.com"), (b"accept-language", b"de"), (b"user-agent", b"a")]
    ) == digest(
        headers=[(b"host", b"example.com"), (b"accept-language", b"de"), (b"user-agent", b"b")]
    )


def test_header_name_case_makes_no_difference() -> None:
    upper = [(b"Host", b"example.com"), (b"Accept-Language", b"de")]
    assert digest(headers=upper) == digest()
    assert snapshot_from_scope(scope(headers=upper), VARY).headers == ((b"accept-language", b"de"),)


def test_host_value_case_makes_no_difference() -> None:
    assert digest(headers=[(b"host", b"EXAMPLE.com"), (b"accept-language", b"de")]) == digest()


def test_order_of_different_headers_makes_no_difference() -> None:
    vary = ("accept-language", "x-tenant")
    one = [(b"host", b"h"), (b"x-tenant", b"t1"), (b"accept-language", b"de")]
    other = [(b"accept-language", b"de"), (b"x-tenant", b"t1"), (b"host", b"h")]
    first = snapshot_from_scope(scope(headers=one), vary)
    assert first == snapshot_from_scope(scope(headers=other), vary)
    assert first.headers == ((b"accept-language", b"de"), (b"x-tenant", b"t1"))


def test_values_of_one_repeated_header_keep_their_order() -> None:
    vary = ("accept-language",)
    one = [(b"accept-language", b"de"), (b"accept-language", b"en")]
    other = [(b"accept-language", b"en"), (b"accept-language", b"de")]
    assert (
        snapshot_from_scope(scope(headers=one), vary).digest
        != snapshot_from_scope(scope(headers=other), vary).digest
    )


def test_huge_query_string_gives_bounded_digest_and_key_names() -> None:
    query = b"q=" + b"a" * (64 * 1024)
    value = digest(query_string=query)
    assert HEX32.match(value)
    assert value != digest(query_string=query + b"b")
    keys = RedisKeys("aw")
    assert len(keys.response(value)) == len("aw:{}:resp") + 32
    assert len(keys.claim(value)) == len("aw:{}:claim") + 32
    assert len(keys.path_index("/" + "a" * 65536)) == len("aw:{}:idx:") + 8 + 40
    assert len(keys.job_id(value, "0123456789abcdef")) == len("aw::") + 32 + 16


@pytest.mark.parametrize(
    ("scheme", "server", "host"),
    [
        ("http", ("Example.Com", 80), "example.com"),
        ("https", ("example.com", 443), "example.com"),
        ("http", ("example.com", 8080), "example.com:8080"),
        ("https", ("example.com", 80), "example.com:80"),
        ("http", ("example.com", None), "example.com"),
        ("http", None, ""),
        ("http", ("/tmp/sock", None), "/tmp/sock"),
    ],
)
def test_host_falls_back_to_server(
    scheme: str, server: tuple[str, int | None] | None, host: str
) -> None:
    snapshot = snapshot_from_scope(scope(scheme=scheme, server=server, headers=[]), VARY)
    assert snapshot.host == host


def test_host_header_wins_over_server() -> None:
    snapshot = snapshot_from_scope(scope(server=("10.0.0.1", 8000)), VARY)
    assert snapshot.host == "example.com"


def test_a_requests_keys_share_its_paths_slot() -> None:
    # Every key one script touches must hash to one Cluster slot: the request's own keys
    # and its path's index, stamp and durations (scripts.LOOKUP, COMMIT).
    keys = RedisKeys("myapp")
    path = "/caf\u00e9/r\u00e9sum\u00e9 \udcff"
    value = digest(path=path)
    assert value.startswith(path_tag(path))
    names = [
        keys.response(value),
        keys.fresh(value),
        keys.claim(value),
        keys.entry_stamp(value),
        keys.path_index(path),
        keys.path_stamp(path),
        keys.durations(path),
    ]
    assert len({key_slot(name.encode("utf-8", "surrogatepass")) for name in names}) == 1
    assert len(set(names)) == len(names)
    assert keys.response(value) == "myapp:{" + value[:8] + "}" + value[8:] + ":resp"
    # The path list's two sets share a slot; a tag's index and stamp share one.
    assert key_slot(keys.paths().encode()) == key_slot(keys.paths_by_expiry().encode())
    assert key_slot(keys.tag("t").encode()) == key_slot(keys.tag_stamp("t").encode())
    assert keys.job_id(value, "t1") != keys.job_id(value, "t2")


def test_paths_sharing_a_hash_tag_keep_indexes_of_their_own() -> None:
    keys = RedisKeys("aw")
    assert keys.path_index("/a") != keys.path_index("/b")
    assert keys.path_stamp("/a") != keys.path_stamp("/b")


@pytest.mark.parametrize("path", ["/caf\udce9", "/\ud800", "/\udfff/x", "/\ud83d\ude00"])
def test_paths_with_lone_surrogates_do_not_crash(path: str) -> None:
    snapshot = snapshot_from_scope(scope(path=path, root_path="/r\udc80"), VARY)
    assert snapshot.path == path
    assert HEX32.match(snapshot.digest)
    assert snapshot.digest != digest(path="/caf\u00e9")
    again = decode_snapshot(encode_snapshot(snapshot))
    assert again == snapshot
    assert again.digest == snapshot.digest


# --- properties ------------------------------------------------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates too
plain_text = st.text(max_size=12)
header_pairs = st.lists(
    st.tuples(st.binary(min_size=1, max_size=6), st.binary(max_size=6)), max_size=3
).map(lambda pairs: tuple(sorted(pairs, key=lambda pair: pair[0])))

snapshots = st.builds(
    RequestSnapshot,
    scheme=st.sampled_from(["http", "https"]) | plain_text,
    host=plain_text,
    root_path=any_text,
    path=any_text,
    raw_path=st.none() | st.binary(max_size=12),
    query_string=st.binary(max_size=12),
    headers=header_pairs,
)

# `credentials` are keyed only through `credential_id` (a MAC), never directly; the
# client's address is replayed, never keyed.
UNKEYED = ("credentials", "client")
FIELDS = [field.name for field in dataclasses.fields(RequestSnapshot) if field.name not in UNKEYED]
FIELD_VALUES = {
    "credential_id": st.binary(max_size=16),
    "scheme": plain_text,
    "host": plain_text,
    "root_path": any_text,
    "path": any_text,
    "raw_path": st.none() | st.binary(max_size=12),
    "query_string": st.binary(max_size=12),
    "headers": header_pairs,
    "server_root_path": st.none() | any_text,
}


@given(snapshots, snapshots)
def test_property_different_snapshots_never_share_a_digest(
    first: RequestSnapshot, second: RequestSnapshot
) -> None:
    if first == second:
        assert first.digest == second.digest
    else:
        assert first.digest != second.digest


@given(snapshots, st.data())
def test_property_one_changed_field_changes_the_digest(
    snapshot: RequestSnapshot, data: st.DataObject
) -> None:
    name = data.draw(st.sampled_from(FIELDS))
    value = data.draw(FIELD_VALUES[name].filter(lambda v: v != getattr(snapshot, name)))
    changed = dataclasses.replace(snapshot, **{name: value})
    assert changed.digest != snapshot.digest


@given(snapshots, st.none() | st.tuples(plain_text, st.integers(0, 65535)))
def test_property_the_clients_address_is_not_keyed(
    snapshot: RequestSnapshot, client: tuple[str, int] | None
) -> None:
    assert dataclasses.replace(snapshot, client=client).digest == snapshot.digest


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (("203.0.113.7", 5000), ("203.0.113.7", 5000)),
        (["::1", 80], ("::1", 80)),
        (None, None),
        (("h",), None),
        (("h", "80"), None),
        (("h", True), None),
        ((b"h", 80), None),
        (("\udce9", 80), None),
        (5, None),
    ],
    ids=str,
)
def test_the_scopes_client_is_taken_only_in_its_asgi_shape(
    client: Any, expected: tuple[str, int] | None
) -> None:
    assert scope_client({"type": "http", "client": client}) == expected


@given(snapshots)
def test_property_same_snapshot_same_digest(snapshot: RequestSnapshot) -> None:
    copy = RequestSnapshot(**{name: getattr(snapshot, name) for name in FIELDS})
    assert copy.digest == snapshot.digest
    assert HEX32.match(snapshot.digest)
    # What the worker computes after the job crossed Redis is the same key.
    assert decode_snapshot(encode_snapshot(snapshot)).digest == snapshot.digest


header_names = st.sampled_from(
    [b"accept-language", b"x-tenant", b"user-agent", b"x-forwarded-host"]
)


@given(
    st.lists(st.tuples(header_names, st.binary(max_size=4)), max_size=6, unique_by=lambda p: p[0]),
    st.randoms(use_true_random=False),
)
def test_property_case_and_order_of_distinct_headers_do_not_matter(
    pairs: list[tuple[bytes, bytes]], rnd: Any
) -> None:
    vary = ("accept-language", "x-tenant")
    base = scope(headers=[(b"host", b"example.com"), *pairs])
    shuffled = [(b"host", b"example.com"), *pairs]
    rnd.shuffle(shuffled)
    recased = [(name.upper() if rnd.random() < 0.5 else name, value) for name, value in shuffled]
    assert (
        snapshot_from_scope(base, vary).digest
        == snapshot_from_scope(scope(headers=recased), vary).digest
    )
