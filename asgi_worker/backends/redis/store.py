"""`RedisStore`: the `Store` protocol (backends/base.py) on Redis and Redis Cluster.

A store holds encoded entries, their freshness, the claims that dedup jobs, and the
indexes that invalidation needs. Each method but `invalidate` is atomic: in Redis one Lua
script (see scripts.py), one round trip. Every index stays near the size of what it names
that is still live (each write forgets a few expired members).

An invalidation is a series of short steps instead, so that no index size holds Redis for
long: it stamps first, then walks the index (or for a prefix, the path list) in batches.
Every entry stored before the stamp is expired; an entry a job stores meanwhile is new
(the job began after the stamp, or its commit would be refused) and may or may not be.

Invalidation races are settled with times, not locks. The claim that starts a job is
taken at a time on the store's clock (`Lookup.claimed_at`), and the job lists its path
for prefix invalidation before its app runs; every invalidation stamps the paths and tags it
touches; and `commit` refuses a result whose claim was taken no later than an invalidation
of its path or of one of its tags. The app runs only after its job was claimed, so a job
never stores what it computed before an invalidation. A job that waited in the queue for
most of its lease first calls `begin`, which renews the lease and takes a new start time.

A large body (`Write.body`) is stored apart from its entry, under a key named by its
version in the entry's slot: written in pieces before the commit, with the claim's lease
as its lifetime; the commit gives it the entry's and names it in the entry's body ref, or
deletes it if refused. What deletes an entry deletes the body its ref names; a body whose
entry a newer commit replaced is kept `REPLACED_BODY_GRACE` at most, for the hits still
reading it (`read_body`), which never see another version's bytes.

Every script touches one Redis Cluster slot (keys.py), so the same code runs on a single
Redis and on a Cluster. What spans slots is a series of single-slot steps, ordered so that
the guarantees above still hold:

- The path list (prefix and glob invalidation). A job lists its path (`list_path`)
  after its claim and before its app runs. An invalidation that reads the list before
  that began before the app ran, so the app sees the new data; one that reads it after
  stamps the path, later than the claim, and refuses the job. A path is delisted
  (`DELIST_PATH`) only if its index held nothing live when read and no claim was listed
  since; a commit stores only under a live claim, whose member keeps the index live, so
  no stored entry's path is ever missing from the list.
- Tags. A job's tags are indexed (`TAG_ADD`) before its commit stores the entry; a tag
  invalidated since the job began refuses it there. A tag invalidation stamps the tag
  first, then stamps each entry it reaches in the tag's index (`DROP`): a commit that
  has not stored yet is refused by the entry's stamp, one that has is expired by the walk.
  Tag stamps and claims may live on different nodes: their order relies on the nodes'
  clocks agreeing (as any two processes' clocks must for `lease_left`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from asgi_worker.backends.base import (
    BACKING_OFF,
    REPLACED_BODY_GRACE,
    Body,
    Committed,
    Lookup,
    Write,
)
from asgi_worker.backends.redis import scripts
from asgi_worker.backends.redis.script_runner import Script
from asgi_worker.core.invalidation_targets import (
    ByGlob,
    ByPath,
    ByQuery,
    ByTag,
    Target,
    glob_range,
    query_matches,
)
from asgi_worker.core.keys import TAG_LENGTH, RedisKeys

# Members of an index read and expired per step: a ZSCAN page, then one script over its
# entries (a tag's members may span several slots: one script per slot). Each step holds
# Redis well under a millisecond or two, whatever the index size.
_PAGE = 256
# Pages of the path list read from Python for a prefix or glob (ZRANGEBYLEX).
_PATHS_PAGE = 500
# A body stored apart is written in SETRANGE commands of at most this many bytes, this many
# to a round trip: Redis is held well under a millisecond per command, and the worker
# holds no copy of the body (the pieces are views of the app's chunks, or runs of small
# chunks joined up to this size).
_PIECE = 1024 * 1024
_PIECES_PER_TRIP = 4

StoreClient = Redis | RedisCluster
"""A client for the cache: one Redis (plain or Sentinel) or a Redis Cluster."""


class RedisStore:
    """A `Store` on one Redis or a Redis Cluster (the same scripts; see keys.py).

    A hit is one script on the request's own keys: one round trip to the node of its slot.
    """

    def __init__(self, redis: StoreClient, *, prefix: str, claim_ttl: float) -> None:
        # The caller owns `redis` and closes it: the queue may share the same client.
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._claim_ms = _milliseconds(claim_ttl)
        # An invalidation stamp matters only to jobs that began before it, and none runs
        # longer than its claim lease: keep the stamp that long, plus a margin.
        self._stamp_ms = self._claim_ms + 60_000
        keys = self._keys
        self._path_list = [keys.paths(), keys.paths_by_expiry(), keys.path_listings()]
        self._lookup = Script(redis, scripts.LOOKUP)
        self._begin = Script(redis, scripts.BEGIN)
        self._list_path = Script(redis, scripts.LIST_PATH)
        self._delist_path = Script(redis, scripts.DELIST_PATH)
        self._tag_add = Script(redis, scripts.TAG_ADD)
        self._commit = Script(redis, scripts.COMMIT)
        self._release = Script(redis, scripts.RELEASE)
        self._back_off = Script(redis, scripts.BACK_OFF)
        self._discard = Script(redis, scripts.DISCARD)
        self._read_body = Script(redis, scripts.READ_BODY)
        self._stamp = Script(redis, scripts.STAMP)
        self._drop = Script(redis, scripts.DROP)

    async def lookup(self, digest: str, token: str, path: str) -> Lookup:
        """See `Store.lookup`."""
        keys = self._keys
        entry, flags, now_us, *held = await self._lookup(
            keys=[
                keys.response(digest),
                keys.fresh(digest),
                keys.claim(digest),
                keys.path_index(path),
            ],
            args=[token, self._claim_ms],
        )
        if flags >= 2:  # claimed (see scripts.LOOKUP)
            return Lookup(entry, flags == 3, True, float(now_us), now_us / 1e6)
        if not held or held[0].startswith(BACKING_OFF.encode()):
            return Lookup(entry, flags == 1, now=now_us / 1e6)
        holder, left_ms = held
        held_for = (self._claim_ms - int(left_ms)) / 1000
        return Lookup(
            entry, flags == 1, now=now_us / 1e6, holder=holder.decode(), held_for=held_for
        )

    async def list_path(self, path: str) -> float:
        """See `Store.list_path`. A new path also delists a few dead ones."""
        now_ms, *due = await self._list_path(
            keys=self._path_list, args=[_text(path), self._claim_ms]
        )
        await asyncio.gather(
            *(self._delist_if_dead(due[i], due[i + 1]) for i in range(0, len(due), 2))
        )
        return int(now_ms) / 1000

    async def _delist_if_dead(self, raw_path: bytes, listings: bytes) -> None:
        # The count was read before the index: a claim listed after this read moves it.
        path = raw_path.decode("utf-8", "surrogatepass")
        newest = await self._redis.zrange(self._keys.path_index(path), -1, -1, withscores=True)
        await self._delist_path(
            keys=self._path_list,
            args=[raw_path, listings, str(int(newest[0][1])) if newest else ""],
        )

    async def _due_at(self, path: str, at_ms: int) -> None:
        """Have the path list look at `path` again at `at_ms` (a hint: see DELIST_PATH)."""
        await self._redis.execute_command(*self._due(path, at_ms))

    def _due(self, path: str, at_ms: int) -> tuple[bytes | str | int, ...]:
        return ("ZADD", self._keys.paths_by_expiry(), "XX", at_ms, _text(path))

    def lease_left(self, claimed_at: float) -> float:
        """See `Store.lease_left`.

        Compares Redis's clock with ours, as arq does with its enqueuers' clocks. If they
        disagree, the cost is a needless renewal, or at worst a job run twice.
        """
        return claimed_at / 1e6 + self._claim_ms / 1000 - time.time()

    async def begin(self, digest: str, token: str, path: str) -> float | None:
        """See `Store.begin`. The path stays listed: the claim being renewed listed it."""
        return await self.take_over(digest, token, token, path)

    async def take_over(self, digest: str, holder: str, token: str, path: str) -> float | None:
        """See `Store.take_over`. The new job lists the path, as every job does."""
        keys = self._keys
        started = await self._begin(
            keys=[keys.claim(digest), keys.path_index(path)],
            args=[token, self._claim_ms, holder],
        )
        return None if started is None else float(started)

    async def commit(self, digest: str, token: str, started: float, write: Write) -> Committed:
        """See `Store.commit`: the tags' indexes first (one step per tag), then the entry.

        A body stored apart is written before both, in pieces, under a key of its own that
        lives for the claim's lease until the commit gives it the entry's lifetime (or
        deletes it, if the commit is refused). Safe to repeat: the same `Write` writes the
        same bytes to the same key, and a key that has its lifetime keeps it.
        """
        keys = self._keys
        if write.body is not None:
            await self._write_body(keys.body(digest, write.body.version), write.body)
        indexed = await asyncio.gather(
            *(
                self._tag_add(
                    keys=[keys.tag(tag), keys.tag_stamp(tag)],
                    args=[int(started), digest, _milliseconds(write.keep)],
                )
                for tag in write.tags
            )
        )
        keys_, args = self._commit_arguments(digest, token, started, write, 0 in indexed)
        # The path list's hint (`due_command`) goes with the commit: one round trip. (A
        # pipeline, not a transaction: on a Cluster the two are on different nodes.)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.execute_command(*self.due_command(write))
            pipe.execute_command(*self._commit.command(keys_, args))
            _, reply = await pipe.execute(raise_on_error=False)
        if isinstance(reply, NoScriptError):  # Redis restarted: the script call loads it
            reply = await self._commit(keys=keys_, args=args)
        elif isinstance(reply, Exception):
            raise reply
        return commit_outcome(reply)

    def commit_command(
        self, digest: str, token: str, started: float, write: Write
    ) -> tuple[bytes | str | int, ...]:
        """`commit` as one EVALSHA command, to send in a caller's own transaction.

        Only for a `write` without tags (those are indexed in steps of their own first:
        use `commit`); send `due_command` with it. `commit_outcome` reads its reply. It
        assumes the script is loaded: if Redis answers `NoScriptError` instead (a first
        commit, or Redis restarted), call `commit`, which loads it.
        """
        assert not write.tags, "a tagged commit takes steps of its own: use commit()"
        assert write.body is None, "a body stored apart is written first: use commit()"
        return self._commit.command(*self._commit_arguments(digest, token, started, write, False))

    def due_command(self, write: Write) -> tuple[bytes | str | int, ...]:
        """What `commit` sends with its script, as a command for a caller's transaction.

        The path was listed until the end of the claim's lease; this has the path list
        look at it again when the entry ends, so that the list stays near the live paths.
        Only a hint (see `DELIST_PATH`), so it may go with a commit that is refused.
        """
        return self._due(write.path, _expiry_ms(write))

    def _commit_arguments(
        self, digest: str, token: str, started: float, write: Write, tag_refused: bool
    ) -> tuple[list[str], list[bytes]]:
        keys = self._keys
        return (
            [
                keys.response(digest),
                keys.fresh(digest),
                keys.claim(digest),
                keys.entry_stamp(digest),
                keys.path_index(write.path),
                keys.path_stamp(write.path),
                keys.durations(write.path),
                keys.body_ref(digest),
                *(() if write.body is None else (keys.body(digest, write.body.version),)),
            ],
            [write.entry, _commit_meta(keys, digest, token, started, write, tag_refused)],
        )

    async def _write_body(self, key: str, body: Body) -> None:
        """Write `body` to `key` in pieces, with the claim's lease as its lifetime for now.

        The last byte goes first, so that Redis makes the string its full size at once
        rather than growing (and copying) it piece by piece.
        """
        last = next(chunk[-1:] for chunk in reversed(body.chunks) if chunk)
        batch: list[tuple[Any, ...]] = [
            ("SETRANGE", key, body.length - 1, last),
            ("PEXPIRE", key, self._claim_ms, "NX"),  # NX: a committed body keeps its own
        ]
        for offset, piece in _pieces(body.chunks, _PIECE):
            batch.append(("SETRANGE", key, offset, piece))
            if len(batch) >= _PIECES_PER_TRIP:
                await self._send(batch)
                batch = []
        await self._send(batch)

    async def _send(self, commands: list[tuple[Any, ...]]) -> None:
        if not commands:
            return
        # A pipeline, not a transaction: every command is on the one key, one node.
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    async def read_body(
        self, digest: str, version: str, length: int, start: int, stop: int
    ) -> bytes | None:
        """See `Store.read_body`: one script, which checks the length and reads the range."""
        if stop <= start:
            return b""
        piece: bytes | None = await self._read_body(
            keys=[self._keys.body(digest, version)], args=[length, start, stop - 1]
        )
        # Shorter than asked: deleted between the length check and the read (never here:
        # one script), or a length that lies; either way not this version's body.
        return piece if piece is not None and len(piece) == stop - start else None

    async def release(self, digest: str, token: str) -> None:
        """See `Store.release`."""
        await self._release(keys=[self._keys.claim(digest)], args=[token])

    async def back_off(self, digest: str, token: str) -> None:
        """See `Store.back_off`."""
        await self._back_off(keys=[self._keys.claim(digest)], args=[token])

    async def discard(self, digest: str, version: str | None = None) -> None:
        """See `Store.discard`."""
        keys = self._keys
        await self._discard(
            keys=[keys.response(digest), keys.fresh(digest), keys.body_ref(digest)],
            args=["" if version is None else keys.body(digest, version)],
        )

    async def typical_duration(self, path: str) -> float | None:
        """See `Store.typical_duration`."""
        # redis-py's stubs want a str field; ours is bytes so that any path round-trips.
        redis: Any = self._redis
        found = await redis.hget(self._keys.durations(path), _text(path))
        return None if found is None else int(found) / 1000

    async def invalidate(self, target: Target, *, soft: bool = False) -> int:
        """See `Store.invalidate`: a stamp, then pages of the index, each a short step."""
        keys = self._keys
        if isinstance(target, ByPath):
            return await self._invalidate_path(target.path, soft)
        if isinstance(target, ByTag):
            await self._stamp(keys=[keys.tag_stamp(target.tag)], args=[self._stamp_ms])
            return await self._walk(keys.tag(target.tag), soft, path_index=False)
        if isinstance(target, ByGlob):
            return await self._invalidate_glob(target, soft)
        assert isinstance(target, ByQuery)
        await self._stamp(keys=[keys.path_stamp(target.path)], args=[self._stamp_ms])
        # The query rules live in Python (invalidation_targets.py): each page's matches are expired.
        params = target.params
        return await self._walk(
            keys.path_index(target.path),
            soft,
            path_index=True,
            select=lambda member: query_matches(member[32:], params),
        )

    async def _invalidate_path(self, path: str, soft: bool) -> int:
        keys = self._keys
        await self._stamp(keys=[keys.path_stamp(path)], args=[self._stamp_ms])
        count = await self._walk(keys.path_index(path), soft, path_index=True)
        if not soft:
            # Due now: the path list forgets the path unless its index still holds
            # something live (a running claim, an entry stored meanwhile), see DELIST_PATH.
            await self._due_at(path, 0)
        return count

    async def _walk(
        self,
        index: str,
        soft: bool,
        *,
        path_index: bool,
        select: Callable[[bytes], bool] | None = None,
    ) -> int:
        """Expire the entries `index` names (those `select` keeps), a page at a time.

        ZSCAN returns every member present from the first call to the last at least once,
        whatever is added or removed meanwhile; a member added after the stamp (a job
        that began after it) may or may not be seen. Claims ('~') are left alone: the
        stamp refuses the jobs that began before it. A member seen twice is sent once.
        """
        sent: set[bytes] = set()
        count = 0
        cursor = 0
        while True:
            cursor, page = await self._redis.zscan(index, cursor, count=_PAGE)
            # Entries of one slot per script: a path's index is all one slot (with the
            # index itself); a tag's may name entries of many.
            groups: dict[bytes, list[bytes]] = {}
            for member, _expiry in page:
                digest = member[:32]
                if member.startswith(b"~") or digest in sent:
                    continue
                if select is None or select(member):
                    sent.add(digest)
                    groups.setdefault(b"" if path_index else digest[:TAG_LENGTH], []).append(member)
            for members in groups.values():
                count += await self._drop_page(index, members, soft, path_index=path_index)
            if cursor == 0:
                return count

    async def _drop_page(
        self, index: str, members: list[bytes], soft: bool, *, path_index: bool
    ) -> int:
        keys = self._keys
        names: list[str] = []
        for member in members:
            digest = member[:32].decode("ascii", "replace")
            names += [
                keys.response(digest),
                keys.fresh(digest),
                keys.entry_stamp(digest),
                keys.body_ref(digest),
            ]
        if path_index:
            names.append(index)
        count, forget, _touched = await self._drop(
            keys=names,
            args=[
                "1" if soft else "0",
                0 if path_index else self._stamp_ms,  # a tag walk stamps each entry
                keys.events(),
                "1" if path_index else "0",
                *members,
            ],
        )
        if forget and not path_index:
            await self._redis.zrem(index, *forget)
        return int(count)

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


def commit_outcome(reply: bytes | str) -> Committed:
    """The `Committed` a commit script's reply stands for."""
    return Committed(reply.decode() if isinstance(reply, bytes) else reply)


def _commit_meta(
    keys: RedisKeys, digest: str, token: str, started: float, write: Write, tag_refused: bool
) -> bytes:
    """The commit script's arguments after the entry, packed in the order it unpacks them."""
    meta = [
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
        tag_refused,
        keys.events(),
        0 if write.body is None else write.body.length,
        _milliseconds(REPLACED_BODY_GRACE),
    ]
    # Redis's cmsgpack predates msgpack's bin type: bytes go as (binary-safe) raw strings.
    packed: bytes = msgpack.packb(meta, use_bin_type=False)
    return packed


def _pieces(chunks: tuple[bytes, ...], size: int) -> Iterator[tuple[int, bytes | memoryview]]:
    """The body `chunks` make as (offset, piece) pairs of at most `size` bytes.

    A large chunk is cut into views of itself (no copy); runs of small chunks are joined
    up to `size`, so that a body sent in many small chunks is not as many commands.
    """
    offset = 0
    run: list[bytes] = []
    run_at = run_size = 0
    for chunk in chunks:
        if run and run_size + len(chunk) > size:
            yield run_at, b"".join(run)
            run, run_size = [], 0
        if len(chunk) >= size:
            view = memoryview(chunk)
            for at in range(0, len(chunk), size):
                yield offset + at, view[at : at + size]
        else:
            if not run:
                run_at = offset
            run.append(chunk)
            run_size += len(chunk)
        offset += len(chunk)
    if run:
        yield run_at, b"".join(run)


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _expiry_ms(write: Write) -> int:
    """When the entry `write` stores ends (ms, this process's clock; a hint is enough)."""
    return round(time.time() * 1000) + _milliseconds(write.keep)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
