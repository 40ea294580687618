"""The `Store` protocol and `RedisStore`, its Redis implementation.

A store holds encoded entries, their freshness, the claims that dedup jobs, and the
indexes that invalidation needs. Each method is atomic: in Redis one Lua script, one
round trip (the query form of invalidation takes two).

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

from .invalidation import ByGlob, ByPath, ByQuery, ByTag, Target, glob_range, query_matches
from .keys import RedisKeys


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

        Returns how many entries were affected.
        """
        ...


# Shared by the scripts below.
_LIBRARY = """
-- Claims and invalidation stamps are ordered in microseconds: at millisecond resolution a
-- request arriving just after an invalidation would often share its tick, and its job's
-- result be refused. (An integer below 2^53, so exact in Lua and in the reply.)
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function now_ms()
  return math.floor(now_us() / 1000)
end
local function keep_at_least(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end
-- The path list for prefix invalidation would only grow: each new path forgets a few
-- whose entries have all expired (bounded work per call).
local function prune_paths(prefix, paths, by_expiry)
  local expired = redis.call('ZRANGEBYSCORE', by_expiry, '-inf', now_ms(), 'LIMIT', 0, 8)
  for _, path in ipairs(expired) do
    if redis.call('EXISTS', prefix .. ':path:' .. redis.sha1hex(path)) == 0 then
      redis.call('ZREM', paths, path)
    end
    redis.call('ZREM', by_expiry, path)
  end
end
local function drop(prefix, digest, soft)
  local base = prefix .. ':{' .. digest .. '}:'
  if redis.call('EXISTS', base .. 'resp') == 0 then return 0 end
  redis.call('DEL', base .. 'fresh')
  if not soft then redis.call('DEL', base .. 'resp') end
  return 1
end
"""

# Registers the path of a job being claimed or begun, so that a prefix invalidation while
# the job runs finds the path and stamps it; returns the time of the claim (µs).
_REGISTER = """
local function register_path(paths, by_expiry, path, claim_ms, prefix)
  local now = now_us()
  if redis.call('ZADD', paths, 0, path) == 1 then
    -- A new path: forget up to 8 whose entries have all expired, so the list stays bounded.
    prune_paths(prefix, paths, by_expiry)
  end
  redis.call('ZADD', by_expiry, 'GT', math.floor(now / 1000) + tonumber(claim_ms), path)
  return now
end
"""

# KEYS: resp, fresh, claim. ARGV: token, claim ms, path, prefix.
# Returns {entry or false, stale 0/1, claim time in µs or 0}. A fresh hit returns before the
# shared functions are even defined: the hit path runs three lines. The shared path index
# keys are named here from the prefix (as the commit names them), so a hit sends no more
# than it needs.
_LOOKUP = (
    """
local entry = redis.call('GET', KEYS[1])
if entry and redis.call('EXISTS', KEYS[2]) == 1 then return {entry, 0, 0} end
"""
    + _LIBRARY
    + _REGISTER
    + """
local stale = entry and 1 or 0
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2])
  -- Our own claim: this is a retry of a lookup whose reply was lost.
  or redis.call('GET', KEYS[3]) == ARGV[1] then
  local paths = ARGV[4] .. ':paths'
  return {entry, stale, register_path(paths, paths .. ':expiry', ARGV[3], ARGV[2], ARGV[4])}
end
return {entry, stale, 0}
"""
)

# KEYS: claim, paths, paths by expiry. ARGV: token, claim ms, path, prefix.
_BEGIN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return register_path(KEYS[2], KEYS[3], ARGV[3], ARGV[2], ARGV[4])
"""

# KEYS: resp, fresh, claim (the request's own keys).
# ARGV: entry, then the rest packed by `_commit_meta` (msgpack, read with Redis's
# cmsgpack): prefix, token, started, fresh ms, keep ms, path, query, failed, retry ms,
# digest, duration ms or false, the tag hashes. One packed argument instead of a dozen
# saves the worker most of redis-py's per-argument encoding.
# The shared keys are named here from the prefix and the path, as `RedisKeys` names them:
# fewer arguments to send per job, and no hashing in the worker.
_COMMIT = """
local entry = ARGV[1]
local prefix, token, started, fresh_ms, keep_ms, path, query, failed, retry_ms, digest,
  duration, tags = unpack(cmsgpack.unpack(ARGV[2]), 1, 12)
local resp, fresh, claim = KEYS[1], KEYS[2], KEYS[3]
local holder = redis.call('GET', claim)
if holder and holder ~= token then return 'refused' end
local function stamped_since(key)
  local at = redis.call('GET', key)
  return at and tonumber(at) >= started
end
local path_hash = redis.sha1hex(path)
local refused = stamped_since(prefix .. ':inv:path:' .. path_hash)
for _, tag_hash in ipairs(tags) do
  refused = refused or stamped_since(prefix .. ':inv:tag:' .. tag_hash)
end
if refused then
  if holder then redis.call('DEL', claim) end
  return 'refused'
end
if failed and redis.call('EXISTS', resp) == 1 then
  redis.call('SET', claim, token, 'PX', retry_ms)
  return 'kept-stale'
end
redis.call('SET', resp, entry, 'PX', keep_ms)
redis.call('SET', fresh, '1', 'PX', fresh_ms)
redis.call('DEL', claim)
local index = prefix .. ':path:' .. path_hash
redis.call('HSET', index, digest, query)
keep_at_least(index, keep_ms)
redis.call('ZADD', prefix .. ':paths', 0, path)
redis.call('ZADD', prefix .. ':paths:expiry', 'GT', now_ms() + keep_ms, path)
if duration then
  local durations = prefix .. ':durations'
  local typical = duration
  local before = redis.call('HGET', durations, path)
  if before then typical = math.floor(tonumber(before) * 0.7 + typical * 0.3) end
  redis.call('HSET', durations, path, typical)
  redis.call('PEXPIRE', durations, 86400000)
end
for _, tag_hash in ipairs(tags) do
  local tag = prefix .. ':tag:' .. tag_hash
  redis.call('SADD', tag, digest)
  keep_at_least(tag, keep_ms)
end
redis.call('PUBLISH', prefix .. ':events', digest)
return 'stored'
"""

# KEYS: claim. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: index (hash of path or set of tag), its stamp, paths. ARGV: prefix, soft, stamp ms,
# path or ''. Stamps, then drops every entry the index names.
_INVALIDATE_INDEX = """
redis.call('SET', KEYS[2], now_us(), 'PX', ARGV[3])
local soft = ARGV[2] == '1'
local digests
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  digests = redis.call('HKEYS', KEYS[1])
else
  digests = redis.call('SMEMBERS', KEYS[1])
end
local count = 0
for _, digest in ipairs(digests) do count = count + drop(ARGV[1], digest, soft) end
if not soft then
  redis.call('DEL', KEYS[1])
  if ARGV[4] ~= '' then redis.call('ZREM', KEYS[3], ARGV[4]) end
end
if count > 0 then redis.call('PUBLISH', ARGV[1] .. ':events', '!') end
return count
"""

# KEYS: path index, path stamp. ARGV: stamp ms. Stamps the path, returns its index.
_STAMP_PATH = """
redis.call('SET', KEYS[2], now_us(), 'PX', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: path index. ARGV: prefix, soft, digests...
_DROP = """
local soft = ARGV[2] == '1'
local count = 0
for i = 3, #ARGV do
  count = count + drop(ARGV[1], ARGV[i], soft)
  if not soft then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
if count > 0 then redis.call('PUBLISH', ARGV[1] .. ':events', '!') end
return count
"""


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
        self._lookup = redis.register_script(_LOOKUP)
        self._begin = redis.register_script(_LIBRARY + _REGISTER + _BEGIN)
        self._commit = redis.register_script(_LIBRARY + _COMMIT)
        self._release = redis.register_script(_RELEASE)
        self._invalidate_index = redis.register_script(_LIBRARY + _INVALIDATE_INDEX)
        self._stamp_path = redis.register_script(_LIBRARY + _STAMP_PATH)
        self._drop = redis.register_script(_LIBRARY + _DROP)

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
        started = await self._begin(
            keys=[self._keys.claim(digest), self._keys.paths(), self._keys.paths_by_expiry()],
            args=[token, self._claim_ms, _text(path), self._keys.prefix],
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
        """See `Store.invalidate`."""
        keys = self._keys
        if isinstance(target, ByPath):
            return await self._invalidate_path(target.path, soft)
        if isinstance(target, ByTag):
            return int(
                await self._invalidate_index(
                    keys=[keys.tag(target.tag), keys.tag_stamp(target.tag), keys.paths()],
                    args=[keys.prefix, "1" if soft else "0", self._stamp_ms, ""],
                )
            )
        if isinstance(target, ByGlob):
            low, high = glob_range(target.pattern)
            candidates = await self._redis.zrangebylex(keys.paths(), low, high)
            count = 0
            for raw in candidates:
                path = raw.decode("utf-8", "surrogatepass")
                if target.matches(path):
                    count += await self._invalidate_path(path, soft)
            return count
        assert isinstance(target, ByQuery)
        index = await self._stamp_path(
            keys=[keys.path_index(target.path), keys.path_stamp(target.path)],
            args=[self._stamp_ms],
        )
        matched = [
            digest
            for digest, query in zip(index[::2], index[1::2], strict=True)
            if query_matches(query, target.params)
        ]
        if not matched:
            return 0
        return int(
            await self._drop(
                keys=[keys.path_index(target.path)],
                args=[keys.prefix, "1" if soft else "0", *matched],
            )
        )

    async def _invalidate_path(self, path: str, soft: bool) -> int:
        keys = self._keys
        return int(
            await self._invalidate_index(
                keys=[keys.path_index(path), keys.path_stamp(path), keys.paths()],
                args=[keys.prefix, "1" if soft else "0", self._stamp_ms, _text(path)],
            )
        )


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
