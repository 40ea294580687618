"""The Lua scripts `RedisStore` runs: each store method is one of them, so it is atomic.

Every script names its KEYS and ARGV above it. They share `_LIBRARY` (and the claim
scripts `_REGISTER`); the public names are the full texts `RedisStore` registers. The
commit and lookup scripts name the shared index keys themselves from the prefix and the
path, as `keys.RedisKeys` does (a store test checks that the two agree).
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
RELEASE = """
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


# The full texts RedisStore registers (the lookup above is one already).
BEGIN = _LIBRARY + _REGISTER + _BEGIN
COMMIT = _LIBRARY + _COMMIT
INVALIDATE_INDEX = _LIBRARY + _INVALIDATE_INDEX
STAMP_PATH = _LIBRARY + _STAMP_PATH
DROP = _LIBRARY + _DROP
