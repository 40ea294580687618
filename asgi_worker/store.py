"""The `Store` protocol and `RedisStore`, its Redis implementation.

A store holds encoded entries, their freshness, the claims that dedup jobs, and the
indexes that invalidation needs. Each method but `invalidate` is atomic: in Redis one Lua
script (see scripts.py), one round trip. Every index stays near the size of what it names
that is still live (each write forgets a few expired members).

An invalidation is a series of short steps instead, so that no index size holds Redis for
long: it stamps first, then walks the index (or for a prefix, the path list) in batches.
Every entry stored before the stamp is expired; an entry a job stores meanwhile is new
(the job began after the stamp, or its commit would be refused) and may or may not be.

Invalidation races are settled with times, not locks. The claim that starts a job is
taken at a time on the store's clock (`Lookup.claimed_at`), and registers the job's path
for prefix invalidation in the same step; every invalidation stamps the paths and tags it
touches; and `commit` refuses a result whose claim was taken no later than an invalidation
of its path or of one of its tags. The app runs only after its job was claimed, so a job
never stores what it computed before an invalidation. A job that waited in the queue for
most of its lease first calls `begin`, which renews the lease and takes a new start time.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
from redis.asyncio import Redis

from . import scripts
from .keys import RedisKeys
from .targets import ByGlob, ByPath, ByQuery, ByTag, Target, glob_range, query_matches


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer of `Store.lookup`."""

    entry: bytes | None = None
    """The stored entry (fresh or stale), or None on a miss."""
    stale: bool = False
    """The entry is past its freshness (served while one refresh runs)."""
    claimed: bool = False
    """This lookup took the claim: the caller must enqueue the job."""
    claimed_at: float | None = field(default=None, compare=False)
    """When the claim was taken, on the store's clock: the job's start time for `commit`
    (and `Store.lease_left`). Set exactly when `claimed` is."""


@dataclass(frozen=True, slots=True)
class Write:
    """What a job stores, and for how long."""

    entry: bytes
    fresh: float
    """Seconds the entry is fresh."""
    keep: float
    """Seconds the entry is kept in all: `fresh` plus the stale window."""
    path: str
    query: bytes
    tags: tuple[str, ...] = ()
    failed: bool = False
    """An error response: if a stale copy exists, keep serving it instead (RFC 5861
    stale-if-error) and try again after `retry_after` seconds."""
    retry_after: float = 1.0
    duration: float | None = None
    """Seconds the app took; folded into the path's typical duration (adaptive Retry-After)."""


class Committed(enum.Enum):
    """What became of a `Store.commit`."""

    STORED = "stored"
    KEPT_STALE = "kept-stale"
    """The job failed; the stale copy stays, and the next refresh waits `retry_after`."""
    REFUSED = "refused"
    """An invalidation came after the job began, or a newer claim took over: not stored."""


class Store(Protocol):
    """Where entries, claims and indexes live. Implementations keep each method atomic."""

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """Return the entry; claim the key for `token` if it is missing or stale and free.

        A claim also registers `path` (the request's), so that a prefix or glob
        invalidation while its job runs finds the path and refuses the job's commit.
        """
        ...

    def lease_left(self, claimed_at: float) -> float:
        """Seconds left of a lease taken at `claimed_at`, by this process's clock (no I/O)."""
        ...

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """Renew the claim of a job about to run; return the store's time, None if lost.

        Needed only when the lease may run out before the job ends (see `lease_left`).
        """
        ...

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """Store the job's result (see `Write`, `Committed`) and release the claim."""
        ...

    async def release(self, digest: str, token: str) -> None:
        """Give up the claim `token` holds (e.g. the job could not be enqueued)."""
        ...

    async def discard(self, digest: str) -> None:
        """Delete the stored entry (e.g. it could not be decoded)."""
        ...

    async def typical_duration(self, path: str) -> float | None:
        """Seconds jobs for `path` have recently taken (a moving average), if known."""
        ...

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """Expire the entries `target` selects: delete them, or if `soft` mark them stale.

        Returns how many entries were affected. Stamps before it expires anything (a job
        that began earlier is refused at commit); on Redis it then runs in short steps,
        not atomically (see the module docstring).
        """
        ...


# One invalidation step may hold Redis this long (the script checks its clock between pages
# of 64 members), and touch at most this many members: well under the ~10 ms that any
# other client of the Redis may have to wait.
_STEP_BUDGET_US = 2_000
_STEP_MEMBERS = 1_000
# Pages read from Python: paths for a prefix (ZRANGEBYLEX), index members for a query
# (ZSCAN; fewer, as each holds a query string, which may be long).
_PATHS_PAGE = 500
_QUERY_PAGE = 200


class RedisStore:
    """A `Store` on one Redis.

    A hit touches only the request's own keys (one Cluster hash tag). A claim also
    registers the path in a shared index, and the commit and invalidation scripts
    maintain shared indexes, so they need a single Redis (or a Cluster where those keys
    are co-located), not a sharded Cluster.
    """

    def __init__(self, redis: Redis, *, prefix: str, claim_ttl: float) -> None:
        # The caller owns `redis` and closes it: the queue may share the same client.
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._claim_ms = _milliseconds(claim_ttl)
        # An invalidation stamp matters only to jobs that began before it, and none runs
        # longer than its claim lease: keep the stamp that long, plus a margin.
        self._stamp_ms = self._claim_ms + 60_000
        self._lookup = redis.register_script(scripts.LOOKUP)
        self._begin = redis.register_script(scripts.BEGIN)
        self._commit = redis.register_script(scripts.COMMIT)
        self._release = redis.register_script(scripts.RELEASE)
        self._invalidate_scan = redis.register_script(scripts.INVALIDATE_SCAN)
        self._stamp = redis.register_script(scripts.STAMP)
        self._drop = redis.register_script(scripts.DROP)

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """See `Store.lookup`."""
        keys = self._keys
        entry, stale, claimed_at = await self._lookup(
            keys=[keys.response(digest), keys.fresh(digest), keys.claim(digest)],
            args=[token, self._claim_ms, _text(path), keys.prefix],
        )
        if claimed_at == 0:
            return Lookup(entry, stale == 1)
        return Lookup(entry, stale == 1, claimed=True, claimed_at=float(claimed_at))

    def lease_left(self, claimed_at: float) -> float:
        """See `Store.lease_left`.

        Compares Redis's clock with ours, as arq does with its enqueuers' clocks. If they
        disagree, the cost is a needless renewal, or at worst a job run twice.
        """
        return claimed_at / 1e6 + self._claim_ms / 1000 - time.time()

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """See `Store.begin`."""
        keys = self._keys
        started = await self._begin(
            keys=[keys.claim(digest), keys.paths(), keys.paths_by_expiry(), keys.path_index(path)],
            args=[token, self._claim_ms, _text(path), keys.prefix],
        )
        return None if started is None else float(started)

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """See `Store.commit`."""
        keys, args = self._commit_arguments(digest, token, started, write)
        return commit_outcome(await self._commit(keys=keys, args=args))

    def commit_command(
        self, digest: str, token: str, started: float, write: Write
    ) -> tuple[bytes | str | int, ...]:
        """`commit` as one EVALSHA command, to send in a caller's own transaction.

        `commit_outcome` reads its reply. It assumes the script is loaded: if Redis answers
        `NoScriptError` instead (a first commit, or Redis restarted), call `commit`, which
        loads it.
        """
        keys, args = self._commit_arguments(digest, token, started, write)
        return ("EVALSHA", self._commit.sha, len(keys), *keys, *args)

    def _commit_arguments(
        self, digest: str, token: str, started: float, write: Write
    ) -> tuple[list[str], list[bytes]]:
        keys = self._keys
        return (
            [keys.response(digest), keys.fresh(digest), keys.claim(digest)],
            [write.entry, _commit_meta(keys, digest, token, started, write)],
        )

    async def release(self, digest: str, token: str) -> None:
        """See `Store.release`."""
        await self._release(keys=[self._keys.claim(digest)], args=[token])

    async def discard(self, digest: str) -> None:
        """See `Store.discard`."""
        await self._redis.delete(self._keys.response(digest), self._keys.fresh(digest))

    async def typical_duration(self, path: str) -> float | None:
        """See `Store.typical_duration`."""
        # redis-py's stubs want a str field; ours is bytes so that any path round-trips.
        redis: Any = self._redis
        found = await redis.hget(self._keys.durations(), _text(path))
        return None if found is None else int(found) / 1000

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """See `Store.invalidate`: a stamp, then steps of a few milliseconds each."""
        keys = self._keys
        if isinstance(target, ByPath):
            return await self._invalidate_path(target.path, soft)
        if isinstance(target, ByTag):
            return await self._scan(keys.tag(target.tag), keys.tag_stamp(target.tag), soft, b"")
        if isinstance(target, ByGlob):
            return await self._invalidate_glob(target, soft)
        assert isinstance(target, ByQuery)
        return await self._invalidate_query(target, soft)

    async def _invalidate_path(self, path: str, soft: bool) -> int:
        keys = self._keys
        return await self._scan(keys.path_index(path), keys.path_stamp(path), soft, _text(path))

    async def _scan(self, index: str, stamp: str, soft: bool, path: bytes) -> int:
        """Stamp, then expire every entry `index` names, one budgeted script call at a time."""
        keys = self._keys
        cursor: bytes | int = 0
        stamp_ms = self._stamp_ms  # the first step stamps, before it drops anything
        count = 0
        touched: set[bytes] = set()
        while True:
            cursor, dropped, digests = await self._invalidate_scan(
                keys=[index, stamp, keys.paths_by_expiry()],
                args=[
                    keys.prefix,
                    "1" if soft else "0",
                    stamp_ms,
                    cursor,
                    _STEP_BUDGET_US,
                    _STEP_MEMBERS,
                    path,
                ],
            )
            stamp_ms = 0
            count += int(dropped)
            touched.update(digests)
            if cursor in (b"0", 0):
                # Soft steps keep the members, so a scan may see one twice: count digests.
                return len(touched) if soft else count

    async def _invalidate_glob(self, target: ByGlob, soft: bool) -> int:
        # The path list is ordered by bytes: page through the candidates from an exclusive
        # lower bound, which paths added or forgotten meanwhile cannot shift.
        low, high = glob_range(target.pattern)
        count = 0
        while True:
            page = await self._redis.zrangebylex(self._keys.paths(), low, high, 0, _PATHS_PAGE)
            for raw in page:
                path = raw.decode("utf-8", "surrogatepass")
                if target.matches(path):
                    count += await self._invalidate_path(path, soft)
            if len(page) < _PATHS_PAGE:
                return count
            low = b"(" + page[-1]

    async def _invalidate_query(self, target: ByQuery, soft: bool) -> int:
        keys = self._keys
        index = keys.path_index(target.path)
        await self._stamp(keys=[keys.path_stamp(target.path)], args=[self._stamp_ms])
        # The query rules live in Python (targets.py): read the index a page at a time
        # (ZSCAN, see scripts.INVALIDATE_SCAN for what it guarantees) and expire the
        # matches of each page. A member seen twice is sent once; claims ('~' and the
        # claim key, see scripts._REGISTER) are not entries.
        sent: set[bytes] = set()
        count = 0
        cursor = 0
        while True:
            cursor, page = await self._redis.zscan(index, cursor, count=_QUERY_PAGE)
            matched = []
            for member, _expiry in page:
                digest, query = member[:32], member[32:]
                if member.startswith(b"~"):
                    continue
                if digest not in sent and query_matches(query, target.params):
                    sent.add(digest)
                    matched.append(member)
            if matched:
                count += int(
                    await self._drop(
                        keys=[index], args=[keys.prefix, "1" if soft else "0", *matched]
                    )
                )
            if cursor == 0:
                return count


def commit_outcome(reply: bytes | str) -> Committed:
    """The `Committed` a commit script's reply stands for."""
    return Committed(reply.decode() if isinstance(reply, bytes) else reply)


def _commit_meta(keys: RedisKeys, digest: str, token: str, started: float, write: Write) -> bytes:
    """The commit script's arguments after the entry, packed in the order it unpacks them."""
    meta = [
        keys.prefix,
        token,
        int(started),
        _milliseconds(write.fresh),
        _milliseconds(write.keep),
        _text(write.path),
        write.query,
        write.failed,
        _milliseconds(write.retry_after),
        digest,
        False if write.duration is None else _milliseconds(write.duration),
        [keys.tag_hash(tag) for tag in write.tags],
    ]
    # Redis's cmsgpack predates msgpack's bin type: bytes go as (binary-safe) raw strings.
    packed: bytes = msgpack.packb(meta, use_bin_type=False)
    return packed


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
