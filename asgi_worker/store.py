"""The `Store` protocol and `RedisStore`, its Redis implementation.

A store holds encoded responses and the claims that dedup jobs. Every method is one Redis
round trip (a Lua script where more than one key or a condition is involved).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from .keys import RedisKeys


class Outcome(enum.Enum):
    """What a lookup found."""

    HIT = "hit"
    """A stored response; `Lookup.entry` holds its bytes."""
    CLAIMED = "claimed"
    """No response, and this lookup took the claim: the caller must enqueue the job."""
    PENDING = "pending"
    """No response, and another request's claim says a job already exists."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer of `Store.lookup`."""

    outcome: Outcome
    entry: bytes | None = None


class Store(Protocol):
    """Where responses and claims live. Implementations must keep each method atomic."""

    async def lookup(self, digest: str, token: str) -> Lookup:
        """Return the stored entry, or else claim the key for `token` if nobody holds it."""
        ...

    async def commit(self, digest: str, token: str, entry: bytes, ttl: float) -> None:
        """Store `entry` for `ttl` seconds and release the claim if `token` still holds it."""
        ...

    async def release(self, digest: str, token: str) -> None:
        """Give up the claim `token` holds (e.g. the job could not be enqueued)."""
        ...

    async def discard(self, digest: str) -> None:
        """Delete the stored entry (e.g. it could not be decoded)."""
        ...


# KEYS: response, claim. ARGV: claim token, claim lease in ms.
# Returns the entry, or 1 when this call claimed, or 0 when a claim is already held.
_LOOKUP = """
local entry = redis.call('GET', KEYS[1])
if entry then return entry end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: response, claim. ARGV: entry, ttl in ms, claim token.
_COMMIT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: claim. ARGV: claim token. Deletes only a claim this token still holds.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """A `Store` on one Redis (or one Cluster slot per request, thanks to hash tags)."""

    def __init__(self, redis: Redis, *, prefix: str, claim_ttl: float) -> None:
        # The caller owns `redis` and closes it: the queue may share the same client.
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._claim_ms = _milliseconds(claim_ttl)
        self._lookup = redis.register_script(_LOOKUP)
        self._commit = redis.register_script(_COMMIT)
        self._release = redis.register_script(_RELEASE)

    async def lookup(self, digest: str, token: str) -> Lookup:
        """See `Store.lookup`."""
        keys = [self._keys.response(digest), self._keys.claim(digest)]
        found = await self._lookup(keys=keys, args=[token, self._claim_ms])
        if isinstance(found, bytes):
            return Lookup(Outcome.HIT, found)
        return Lookup(Outcome.CLAIMED if found == 1 else Outcome.PENDING)

    async def commit(self, digest: str, token: str, entry: bytes, ttl: float) -> None:
        """See `Store.commit`."""
        keys = [self._keys.response(digest), self._keys.claim(digest)]
        await self._commit(keys=keys, args=[entry, _milliseconds(ttl), token])

    async def release(self, digest: str, token: str) -> None:
        """See `Store.release`."""
        await self._release(keys=[self._keys.claim(digest)], args=[token])

    async def discard(self, digest: str) -> None:
        """See `Store.discard`."""
        await self._redis.delete(self._keys.response(digest))


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
