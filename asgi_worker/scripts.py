"""The Lua scripts `RedisStore` runs: each store method is one of them, so it is atomic.

Every script names its KEYS and ARGV above it. They share `_LIBRARY` (and the claim
scripts `_REGISTER`); the public names are the full texts `RedisStore` registers. The
commit and lookup scripts name the shared index keys themselves from the prefix and the
path, as `keys.RedisKeys` does (a store test checks that the two agree).

Bounded indexes. Every index (a path's entries, a tag's, the path list) is a sorted set
scored by when what it names expires, and every write that adds to one also forgets a few
of its expired members: it stays near the size of what is live, at O(1) work per write.
Invalidation walks an index with ZSCAN, a time budget per call (`INVALIDATE_SCAN`), so no
index size ever holds Redis for long; `RedisStore` calls it until the scan is done.
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
local function path_index(prefix, path)
  return prefix .. ':idx:path:' .. redis.sha1hex(path)
end
-- Each new path in the path list (for the same reason as `forget_expired`) comes with
-- forgetting up to 4 whose entries and claims have all ended. The score only says when to
-- look: a path whose index still holds a live member (another entry, a running claim) is
-- rescored to its newest instead. So a write may set the score to its own end, even below
-- what others hold: never too early to be safe, and the path goes soon after it is dead.
local function prune_paths(prefix, paths, by_expiry, now)
  local expired = redis.call('ZRANGEBYSCORE', by_expiry, '-inf', '(' .. now, 'LIMIT', 0, 4)
  for _, path in ipairs(expired) do
    local newest = redis.call('ZRANGE', path_index(prefix, path), -1, -1, 'WITHSCORES')
    if newest[2] and tonumber(newest[2]) > now then
      redis.call('ZADD', by_expiry, 'GT', newest[2], path)
    else
      redis.call('ZREM', paths, path)
      redis.call('ZREM', by_expiry, path)
    end
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
# The claim is also a member of the path's index until its job commits ('~' and the claim
# key's name, scored by the end of the lease; entry members start with a hex digit): the
# path stays in the path list while a job of it runs, not for a whole lease after. (Named
# by the key, not the token: a claim given up by `RELEASE`, which names no shared key,
# leaves a member that the next claim of the same request reuses.)
_REGISTER = """
local function register_path(paths, by_expiry, index, path, claim_ms, prefix, claim)
  local now = now_us()
  local ms = math.floor(now / 1000)
  local lease_end = ms + tonumber(claim_ms)
  add_member(index, lease_end, '~' .. claim, ms)
  keep_at_least(index, claim_ms)
  local added = redis.call('ZADD', paths, 0, path)
  redis.call('ZADD', by_expiry, 'GT', lease_end, path)
  -- A new path: forget a few whose entries and claims have all ended (see `prune_paths`);
  -- after the path's own score is raised, so that it is never one of them.
  if added == 1 then prune_paths(prefix, paths, by_expiry, ms) end
  return now
end
"""

# KEYS: resp, fresh, claim. ARGV: token, claim ms, path, prefix.
# Returns {entry or false, stale 0/1, claim time in µs or 0}. A fresh hit returns before the
# shared functions are even defined: the hit path runs three lines. The shared path index
# keys are named here from the prefix (as the commit names them), so a hit sends no more
# than it needs.
LOOKUP = (
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
  local prefix, paths = ARGV[4], ARGV[4] .. ':paths'
  local index = path_index(prefix, ARGV[3])
  return {
    entry, stale,
    register_path(paths, paths .. ':expiry', index, ARGV[3], ARGV[2], prefix, KEYS[3])
  }
end
return {entry, stale, 0}
"""
)

# KEYS: claim, paths, paths by expiry, path index. ARGV: token, claim ms, path, prefix.
_BEGIN = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return register_path(KEYS[2], KEYS[3], KEYS[4], ARGV[3], ARGV[2], ARGV[4], KEYS[1])
"""

# KEYS: resp, fresh, claim (the request's own keys).
# ARGV: entry, then the rest packed by `store._commit_meta` (msgpack, read with Redis's
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
local index = prefix .. ':idx:path:' .. path_hash
local claimed = '~' .. claim  -- the claim's member of the path's index (`register_path`)
local refused = stamped_since(prefix .. ':inv:path:' .. path_hash)
for _, tag_hash in ipairs(tags) do
  refused = refused or stamped_since(prefix .. ':inv:tag:' .. tag_hash)
end
if refused then
  if holder then redis.call('DEL', claim) end
  redis.call('ZREM', index, claimed)
  return 'refused'
end
if failed and redis.call('EXISTS', resp) == 1 then
  -- The claim stays as a back-off marker; no job runs under it.
  redis.call('SET', claim, token, 'PX', retry_ms)
  redis.call('ZREM', index, claimed)
  return 'kept-stale'
end
redis.call('SET', resp, entry, 'PX', keep_ms)
redis.call('SET', fresh, '1', 'PX', fresh_ms)
redis.call('DEL', claim)
-- Each index scores the entry by its expiry (a plain ZADD: a shorter new lifetime lowers
-- it); a new member comes with forgetting a few expired ones (see `forget_expired`).
local now = now_ms()
local expiry = now + keep_ms
redis.call('ZREM', index, claimed)
add_member(index, expiry, digest .. query, now)
keep_at_least(index, keep_ms)
local paths, by_expiry = prefix .. ':paths', prefix .. ':paths:expiry'
local added = redis.call('ZADD', paths, 0, path)
-- Not GT: the job's claim ended, so its lease must not keep the path listed (other entries
-- and claims of the path are seen when the score comes due, see `prune_paths`).
redis.call('ZADD', by_expiry, expiry, path)
if added == 1 then prune_paths(prefix, paths, by_expiry, now) end
if duration then
  local durations = prefix .. ':durations'
  local typical = duration
  local before = redis.call('HGET', durations, path)
  if before then typical = math.floor(tonumber(before) * 0.7 + typical * 0.3) end
  redis.call('HSET', durations, path, typical)
  redis.call('PEXPIRE', durations, 86400000)
end
for _, tag_hash in ipairs(tags) do
  local tag = prefix .. ':idx:tag:' .. tag_hash
  add_member(tag, expiry, digest, now)
  keep_at_least(tag, keep_ms)
end
redis.call('PUBLISH', prefix .. ':events', digest)
return 'stored'
"""

# KEYS: claim. ARGV: token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: index (sorted set of a path's or a tag's entries), its stamp, paths by expiry.
# ARGV: prefix, soft, stamp ms (0: stamped by an earlier call), ZSCAN cursor, budget µs,
# most members, path or ''.
# One step of an invalidation: stamps (first call only, before anything is dropped), then
# walks the index from the cursor until the scan is done or the budget is spent, so no
# index size holds Redis for long. ZSCAN returns every member present from the first call
# to the last at least once, whatever is added or removed meanwhile; a member added after
# the stamp (a job that began after it) may or may not be seen. Hard drops each entry and
# its member; soft marks entries stale and keeps the members of live ones. Claims are left
# alone (the stamp refuses the jobs that began before it). Returns {next cursor ('0':
# done), entries expired, their digests if soft}: a soft scan may see a member twice, so
# the caller counts the digests, each once.
_INVALIDATE_SCAN = """
local began = now_us()
if ARGV[3] ~= '0' then redis.call('SET', KEYS[2], began, 'PX', ARGV[3]) end
local prefix, soft, cursor = ARGV[1], ARGV[2] == '1', ARGV[4]
local budget, most = tonumber(ARGV[5]), tonumber(ARGV[6])
local count, seen, touched = 0, 0, {}
repeat
  local page = redis.call('ZSCAN', KEYS[1], cursor, 'COUNT', 64)
  cursor = page[1]
  local members = page[2]
  for i = 1, #members, 2 do
    local member = members[i]
    if string.sub(member, 1, 1) ~= '~' then
      local digest = string.sub(member, 1, 32)
      local dropped = drop(prefix, digest, soft)
      if dropped == 1 then
        count = count + 1
        if soft then touched[#touched + 1] = digest end
      end
      -- An entry gone already (expired, discarded) leaves its member behind: forget it.
      if not soft or dropped == 0 then redis.call('ZREM', KEYS[1], member) end
    end
  end
  seen = seen + #members / 2
until cursor == '0' or seen >= most or now_us() - began >= budget
if count > 0 then redis.call('PUBLISH', prefix .. ':events', '!') end
if cursor == '0' and not soft and ARGV[7] ~= '' then
  -- Due now: the path list forgets the path unless its index still holds something live
  -- (a running claim, an entry stored meanwhile), see `prune_paths`.
  redis.call('ZADD', KEYS[3], 'XX', now_ms(), ARGV[7])
end
return {cursor, count, touched}
"""

# KEYS: stamp. ARGV: stamp ms. Stamps a path before its index is read (query invalidation).
_STAMP = """
redis.call('SET', KEYS[1], now_us(), 'PX', ARGV[1])
return 1
"""

# KEYS: path index. ARGV: prefix, soft, members (digest + query)...
# Expires the entries a query invalidation chose, from one page of the index.
_DROP = """
local soft = ARGV[2] == '1'
local count = 0
for i = 3, #ARGV do
  local dropped = drop(ARGV[1], string.sub(ARGV[i], 1, 32), soft)
  count = count + dropped
  if not soft or dropped == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
if count > 0 then redis.call('PUBLISH', ARGV[1] .. ':events', '!') end
return count
"""


# The full texts RedisStore registers (the lookup above is one already).
BEGIN = _LIBRARY + _REGISTER + _BEGIN
COMMIT = _LIBRARY + _COMMIT
INVALIDATE_SCAN = _LIBRARY + _INVALIDATE_SCAN
STAMP = _LIBRARY + _STAMP
DROP = _LIBRARY + _DROP
