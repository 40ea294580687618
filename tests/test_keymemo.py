"""`KeyMemo` gives exactly what `snapshot_from_scope` builds, from memory when it may.

The cases come in pairs whose scope parts Python would call equal, or that differ only in
what a careless memo key would drop, while the snapshots (and so the cache keys) differ.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_worker.core.credentials import CredentialGuard
from asgi_worker.core.keys import snapshot_from_scope
from asgi_worker.web.key_memo import KeyMemo

from .test_keys import VARY, scope

# Pairs that must not share an entry.
CASES = {
    "plain": scope(),
    "other query": scope(query_string=b"a=2"),
    "host case": scope(headers=[(b"Host", b"EXAMPLE.com")]),
    "empty first host, then a": scope(headers=[(b"host", b""), (b"host", b"a.example")]),
    "empty first host, then b": scope(headers=[(b"host", b""), (b"host", b"b.example")]),
    "no host, port 1": scope(headers=[], server=("h", 1)),
    "no host, port True": scope(headers=[], server=("h", True)),
    "no host, port 1.0": scope(headers=[], server=("h", 1.0)),
    "no host, server list": scope(headers=[], server=["h", 1]),
    "vary de": scope(headers=[(b"host", b"x"), (b"accept-language", b"de")]),
    "vary en": scope(headers=[(b"host", b"x"), (b"Accept-Language", b"en")]),
    "vary de, en": scope(
        headers=[(b"host", b"x"), (b"accept-language", b"de"), (b"accept-language", b"en")]
    ),
    "vary en, de": scope(
        headers=[(b"host", b"x"), (b"accept-language", b"en"), (b"accept-language", b"de")]
    ),
    "bytearray value": scope(headers=[(b"host", bytearray(b"example.com"))]),
    "no raw_path": scope(raw_path=None),
    "root path": scope(root_path="/api"),
    "http": scope(scheme="http"),
    "missing path": {k: v for k, v in scope().items() if k != "path"},
    "path as bytes": scope(path=b"/items"),
    "lone surrogate": scope(path="/\udcff"),
}


def built(target: dict[str, Any], guard: CredentialGuard | None = None) -> tuple[Any, str]:
    snapshot = snapshot_from_scope(target, VARY, guard)
    return snapshot, snapshot.digest


def test_every_case_gets_what_snapshot_from_scope_builds_first_and_from_memory() -> None:
    memo = KeyMemo(VARY, None)
    for _ in range(2):  # the second round answers from memory where it may
        for name, target in CASES.items():
            assert memo.key(target) == built(target), name
    # The pairs really differ in their keys:
    assert built(CASES["no host, port 1"]) != built(CASES["no host, port True"])
    assert built(CASES["empty first host, then a"]) != built(CASES["empty first host, then b"])


def test_a_seen_request_is_answered_from_memory() -> None:
    memo = KeyMemo(VARY, None)
    first = memo.key(scope())
    assert memo.key(scope()) is first
    assert len(memo) == 1


@pytest.mark.parametrize(
    "name", ["no host, port True", "no host, port 1.0", "no host, server list", "bytearray value"]
)
def test_parts_python_calls_equal_to_others_are_never_memoized(name: str) -> None:
    memo = KeyMemo(VARY, None)
    memo.key(CASES[name])
    assert len(memo) == 0


def test_large_requests_are_keyed_afresh() -> None:
    memo = KeyMemo(VARY, None)
    big = scope(query_string=b"q=" + b"x" * 4096)
    assert memo.key(big) == built(big)
    big_header = scope(headers=[(b"host", b"h" * 2048)])
    assert memo.key(big_header) == built(big_header)
    assert len(memo) == 0


def test_credentials_in_the_key_are_never_memoized() -> None:
    guard = CredentialGuard("secret")
    memo = KeyMemo(VARY, guard)
    target = scope(headers=[(b"host", b"x"), (b"authorization", b"Bearer a")])
    first = memo.key(target)
    assert first == built(target, guard)
    assert len(memo) == 0


def test_the_memo_is_bounded_and_forgets_the_oldest() -> None:
    memo = KeyMemo(VARY, None, max_entries=3)
    targets = [scope(query_string=f"n={n}".encode()) for n in range(5)]
    for target in targets:
        memo.key(target)
    assert len(memo) == 3
    oldest = memo.key(targets[0])  # evicted: built again, and still right
    assert oldest == built(targets[0])
    assert memo.key(targets[4]) == built(targets[4])


_parts = st.fixed_dictionaries(
    {
        "scheme": st.sampled_from(["http", "https"]),
        "path": st.sampled_from(["/", "/a", "/a/", "/\udcff"]),
        "raw_path": st.sampled_from([None, b"/a", b"/%61"]),
        "query_string": st.sampled_from([b"", b"a=1", b"a=1&a=1"]),
        "server": st.sampled_from([None, ("h", 1), ("h", True), ("h", 80), ["h", 1], (None, None)]),
        "headers": st.lists(
            st.tuples(
                st.sampled_from([b"host", b"Host", b"accept-language", b"x-other"]),
                st.sampled_from([b"", b"a", b"A", b"de"]),
            ),
            max_size=3,
        ),
    }
)


@settings(max_examples=300)
@given(st.lists(_parts, min_size=1, max_size=4), st.lists(st.integers(0, 3), max_size=40))
def test_any_sequence_of_requests_gets_what_snapshot_from_scope_builds(
    pool: list[dict[str, Any]], order: list[int]
) -> None:
    # A few requests from small domains, asked again and again in any order.
    memo = KeyMemo(VARY, None, max_entries=3)
    for index in [*range(len(pool)), *order]:
        target = scope(**pool[index % len(pool)])
        assert memo.key(target) == built(target)
