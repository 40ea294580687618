"""The Lua scripts `RedisStore` runs: each touches one Redis Cluster slot.

Each names every key it touches in KEYS (keys.py says which keys share a slot).

Every script names its KEYS and ARGV above it; they share `_LIBRARY`. The same scripts run
on a single Redis and on a Cluster: one key layout, one code path.

Bounded indexes. Every index (a path's entries, a tag's, the path list) is a sorted set
scored by when what it names expires, and every write that adds to one also forgets a few
of its expired members: it stays near the size of what is live, at O(1) work per write.
Invalidation walks an index a page at a time (ZSCAN from Python, then `DROP` with the
page's keys), so no index size ever holds Redis for long.

What spans slots is done in separate single-slot steps, ordered so that the races the
one-script version closed stay closed (store.py walks through each):

- the path list (`LIST_PATH`, `DELIST_PATH`) is written by each job after its claim and
  before its app runs, so no app runs before its path is listed;
- a job's tags are indexed (`TAG_ADD`, refusing a job that a tag invalidation
  overtook) before its commit stores the entry, and a tag invalidation stamps each entry
  it reaches (`DROP`), so a commit still on its way is refused.
"""

from __future__ import annotations

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
-- Each new member of an index (scores are expiries in ms) comes with forgetting up to 4
-- that have expired. A member expires at most once per time it was added, so any limit of
-- 2 or more keeps the backlog of expired members small under steady churn, and 4 drains a
-- burst quickly. A write that only rescores a member adds nothing to expire: no need.
-- O(log N) per new member, whatever the index size.
local function forget_expired(index, now)
  local expired = redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. now, 'LIMIT', 0, 4)
  if #expired > 0 then redis.call('ZREM', index, unpack(expired)) end
end
local function add_member(index, expiry, member, now)
  if redis.call('ZADD', index, expiry, member) == 1 then forget_expired(index, now) end
end
-- A claim is a member of its path's index until its job commits ('~' and the claim key's
-- name, scored by the end of the lease; entry members start with a hex digit): the path
-- stays in the path list while a job of it runs (see `DELIST_PATH`). Named by the key,
-- not the token: a claim given up by `RELEASE` leaves a member the next claim reuses.
-- Returns the time of the claim (µs): the job's start, for its commit.
local function index_claim(index, claim, claim_ms)
  local now = now_us()
  local ms = math.floor(now / 1000)
  add_member(index, ms + tonumber(claim_ms), '~' .. claim, ms)
  keep_at_least(index, claim_ms)
  return now
end
"""

# KEYS: resp, fresh, claim, path index. ARGV: token, claim ms.
# Returns {entry or false, flags, Redis's time in µs}: flags 1 if the entry is stale, 2 if
# this lookup claimed the key (the time is then the claim's). The time is what `Age` is
# computed against: the entry's `stored_at` is on this clock too, so no host's clock
# enters it. Where another holds the claim, also its holder and the ms left of its lease
# (a lost job's check, see lost.py). A fresh hit returns before the shared functions are
# even defined: the hit path runs four lines.
LOOKUP = (
    """
local entry = redis.call('GET', KEYS[1])
if entry and redis.call('EXISTS', KEYS[2]) == 1 then
  local t = redis.call('TIME')
  return {entry, 0, t[1] * 1000000 + t[2]}
end
"""
    + _LIBRARY
    + """
local stale = entry and 1 or 0
if redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {entry, stale + 2, index_claim(KEYS[4], KEYS[3], ARGV[2])}
end
local holder = redis.call('GET', KEYS[3])
-- Our own claim: this is a retry of a lookup whose reply was lost.
if holder == ARGV[1] then return {entry, stale + 2, index_claim(KEYS[4], KEYS[3], ARGV[2])} end
return {entry, stale, now_us(), holder, redis.call('PTTL', KEYS[3])}
"""
)

# KEYS: claim, path index. ARGV: token, claim ms, the holder it replaces: the token itself
# (a job renews its own claim) or a lost job's (its claim is taken over, see lost.py).
_BEGIN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[3] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return index_claim(KEYS[2], KEYS[1], ARGV[2])
"""

# KEYS: paths, paths by expiry, listings. ARGV: path, lease ms.
# Lists the path of a claimed job (prefix and glob invalidation read the list), and counts
# the listing (`listings`: path -> how often listed). The score only says when to look at
# the path again: the end of the lease (GT: a shorter one never lowers it); other steps
# may set it to anything (`DELIST_PATH` checks the index before it delists). Returns
# Redis's time in ms first (the job's app runs next: its entry's `stored_at` counts on from
# it); a new path, then up to 4 others that have come due, as path, listing count, ...
LIST_PATH = (
    _LIBRARY
    + """
local now = now_ms()
local added = redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('ZADD', KEYS[2], 'GT', now + tonumber(ARGV[2]), ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
if added == 0 then return {now} end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 4)
local found = {now}
for _, path in ipairs(due) do
  found[#found + 1] = path
  found[#found + 1] = redis.call('HGET', KEYS[3], path) or '0'
  -- Handed to this caller to check: due again only later, so that concurrent new paths
  -- check different ones (and one whose checker died is checked again).
  redis.call('ZADD', KEYS[2], now + 5000, path)
end
return found
"""
)

# KEYS: paths, paths by expiry, listings. ARGV: path, its listing count as `LIST_PATH`
# returned it, the score of the newest member of its index ('' if none), read after it.
# Delists a path whose index held nothing live when read, unless it was listed again
# since (its count moved): a claim is listed before its job runs, so a job that began
# after the index was read keeps its path. A path whose index held something live is
# rescored to its newest member's end instead.
DELIST_PATH = (
    _LIBRARY
    + """
if (redis.call('HGET', KEYS[3], ARGV[1]) or '0') ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' and tonumber(ARGV[3]) > now_ms() then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""
)

# KEYS: tag index, tag stamp. ARGV: the job's start (µs), digest, keep ms.
# Indexes an entry under one of its tags before its commit stores it; returns 0 (and
# indexes nothing) if the tag was invalidated since the job began: the commit is then
# refused. An invalidation stamping the tag after this step finds the member in the index
# and stamps the entry (`DROP`), which refuses the commit if it has not stored yet.
_TAG_ADD = """
local at = redis.call('GET', KEYS[2])
if at and tonumber(at) >= tonumber(ARGV[1]) then return 0 end
local keep_ms = tonumber(ARGV[3])
local now = now_ms()
add_member(KEYS[1], now + keep_ms, ARGV[2], now)
keep_at_least(KEYS[1], keep_ms)
return 1
"""

# KEYS: resp, fresh, claim, entry stamp, path index, path stamp, durations, body ref, and
# the body stored apart if the entry has one (written before, `RedisStore._write_body`).
# ARGV: entry, then the rest packed by `store._commit_meta` (msgpack, read with Redis's
# cmsgpack): token, started, fresh ms, keep ms, path, query, failed, retry ms, digest,
# duration ms or false, refused by a tag (`TAG_ADD`), events channel, body length (0:
# none apart), replaced body grace ms. One packed argument instead of a dozen saves the
# worker most of redis-py's per-argument encoding.
# Stores only under the job's own live claim: a claim is a live member of the path's
# index, which keeps the path listed (`DELIST_PATH`), so a stored entry's path is listed.
# A body apart lives exactly as long as its entry: same lifetime, and the body ref names
# it so that what deletes the entry (`DROP`, `DISCARD`) deletes it too. The body of the
# entry replaced is not the one `ref` names any more: it is kept `grace_ms` at most, for
# the hits still reading it (its key is reached by name: it shares the entry's slot).
_COMMIT = """
local entry = ARGV[1]
local token, started, fresh_ms, keep_ms, path, query, failed, retry_ms, digest, duration,
  tag_refused, channel, length, grace_ms = unpack(cmsgpack.unpack(ARGV[2]), 1, 14)
local resp, fresh, claim, entry_stamp, index, path_stamp, durations, ref, body =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local claimed = '~' .. claim  -- the claim's member of the path's index (`index_claim`)
-- A body written for a commit that stores nothing: deleted, unless it is the stored
-- entry's own (a retry of a commit that went through, whose reply was lost).
local function refuse()
  if body and redis.call('GET', ref) ~= body then redis.call('DEL', body) end
  return 'refused'
end
local holder = redis.call('GET', claim)
if not holder then
  -- The lease ran out (or Redis lost it): the path may have left the path list meanwhile.
  redis.call('ZREM', index, claimed)
  return refuse()
end
if holder == '!' .. token then  -- this commit, sent again
  refuse()
  return 'kept-stale'
end
if holder ~= token then return refuse() end
local function stamped_since(key)
  local at = redis.call('GET', key)
  return at and tonumber(at) >= started
end
-- A body not whole (evicted while it was written) is never stored: the next request
-- runs the job again.
if tag_refused or stamped_since(path_stamp) or stamped_since(entry_stamp)
  or (body and redis.call('STRLEN', body) ~= length) then
  redis.call('DEL', claim)
  redis.call('ZREM', index, claimed)
  return refuse()
end
if failed and redis.call('EXISTS', resp) == 1 then
  -- The claim stays as a back-off marker; no job runs under it, and it says so ('!' and
  -- the token: no token starts with it), so that no request takes it for a lost job.
  redis.call('SET', claim, '!' .. token, 'PX', retry_ms)
  redis.call('ZREM', index, claimed)
  refuse()
  return 'kept-stale'
end
local replaced = redis.call('GET', ref)
if replaced and replaced ~= body then redis.call('PEXPIRE', replaced, grace_ms, 'LT') end
redis.call('SET', resp, entry, 'PX', keep_ms)
redis.call('SET', fresh, '1', 'PX', fresh_ms)
if body then
  redis.call('SET', ref, body, 'PX', keep_ms)
  redis.call('PEXPIRE', body, keep_ms)
else
  redis.call('DEL', ref)
end
redis.call('DEL', claim)
-- The index scores the entry by its expiry (a plain ZADD: a shorter new lifetime lowers
-- it); a new member comes with forgetting a few expired ones (see `forget_expired`).
local now = now_ms()
redis.call('ZREM', index, claimed)
add_member(index, now + keep_ms, digest .. query, now)
keep_at_least(index, keep_ms)
if duration then
  local typical = duration
  local before = redis.call('HGET', durations, path)
  if before then typical = math.floor(tonumber(before) * 0.7 + typical * 0.3) end
  redis.call('HSET', durations, path, typical)
  redis.call('PEXPIRE', durations, 86400000)
end
redis.call('PUBLISH', channel, digest)
return 'stored'
"""

# KEYS: claim. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: claim. ARGV: token.
# Keeps the claim the token holds as a back-off marker (as `_COMMIT` does after a failed
# refresh) for what is left of its lease: the job failed for good, and the next one waits.
BACK_OFF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local left = redis.call('PTTL', KEYS[1])
if left <= 0 then return 0 end
redis.call('SET', KEYS[1], '!' .. ARGV[1], 'PX', left)
return 1
"""

# KEYS: stamp. ARGV: stamp ms. The first step of every invalidation: the stamp is written
# before anything is dropped, and refuses every job of the path or tag that began before.
_STAMP = """
redis.call('SET', KEYS[1], now_us(), 'PX', ARGV[1])
return 1
"""

# KEYS: resp, fresh, entry stamp, body ref of each entry (in fours), then the index if it
# shares their slot. ARGV: soft, entry stamp ms ('0': none), events channel, index given, then
# the index member of each entry.
# Expires one page of an index (read with ZSCAN): hard deletes, soft marks stale. A tag
# walk stamps each entry, which refuses a job of it that began before and has not yet
# stored (see `_TAG_ADD`). Returns {entries expired, the members to forget (hard: all;
# soft: those whose entry is gone), the digests expired}; the index, if given, forgets
# them here, else the caller removes them from it. A hard drop deletes an entry's body
# stored apart too (named by its body ref, in the entry's slot); a soft one keeps it.
_DROP = """
local soft, stamp_ms, channel = ARGV[1] == '1', ARGV[2], ARGV[3]
local now = stamp_ms ~= '0' and now_us() or 0
local count, forget, touched = 0, {}, {}
for i = 5, #ARGV do
  local first = (i - 5) * 4
  local resp, fresh, stamp, ref = KEYS[first + 1], KEYS[first + 2], KEYS[first + 3],
    KEYS[first + 4]
  local member = ARGV[i]
  if now > 0 then redis.call('SET', stamp, now, 'PX', stamp_ms) end
  if not soft then
    local body = redis.call('GET', ref)
    if body then redis.call('DEL', body, ref) end
  end
  if redis.call('EXISTS', resp) == 1 then
    redis.call('DEL', fresh)
    if not soft then redis.call('DEL', resp) end
    count = count + 1
    touched[#touched + 1] = string.sub(member, 1, 32)
    if not soft then forget[#forget + 1] = member end
  else
    -- An entry gone already (expired, discarded) leaves its member behind: forget it.
    forget[#forget + 1] = member
  end
end
if ARGV[4] == '1' and #forget > 0 then redis.call('ZREM', KEYS[#KEYS], unpack(forget)) end
if count > 0 then redis.call('PUBLISH', channel, '!') end
return {count, forget, touched}
"""


# KEYS: resp, fresh, body ref. ARGV: the body key the caller found gone, or ''.
# Deletes an entry and its body stored apart; with a body key given, only if the entry's
# body is still that one (a newer commit's entry stays).
DISCARD = """
local body = redis.call('GET', KEYS[3])
if ARGV[1] ~= '' and body and body ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if body then redis.call('DEL', body) end
return 1
"""

# KEYS: a body stored apart. ARGV: its length, the first and last byte of the range.
# The range, or false if the body is gone or is not that long (not the version named).
READ_BODY = """
if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[1]) then return false end
return redis.call('GETRANGE', KEYS[1], ARGV[2], ARGV[3])
"""


# The full texts RedisStore registers (the lookup above is one already).
BEGIN = _LIBRARY + _BEGIN
COMMIT = _LIBRARY + _COMMIT
TAG_ADD = _LIBRARY + _TAG_ADD
STAMP = _LIBRARY + _STAMP
DROP = _LIBRARY + _DROP
