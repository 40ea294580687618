"""The Lua scripts on arq's queue: enqueueing (the web side) and taking jobs (the worker).

Both run on the queue's Redis, which is never a Cluster (arq's own end-of-job transaction
names a fixed key), so the keys a script derives from a job id (its in-progress key) need
not be declared for slot routing; each script names them above it.

The wake list. Every enqueue pushes a token on `<queue>:wake`; an idle `ReplayWorker`
blocks on it (BLPOP) instead of polling the queue every few milliseconds, so an idle
worker costs about one command a second and a new job starts within a round trip. The
list is trimmed to `WAKE_TOKENS` tokens: with every worker busy the tokens pile up, and
each one left over costs an idle worker one look at the queue later, no more.
"""

from __future__ import annotations

WAKE_TOKENS = 16
"""Longest the wake list gets: about the most workers one queue is expected to wake."""

# Both scripts score jobs by Redis's clock, not their callers': a job scored by a web
# process whose clock runs ahead of the worker's would not be due for the worker yet (by
# as little as a rounding, it cost each job a wait of a millisecond and more).
_CLOCK = """
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: job, queue, the path's fair-queueing clock, durations (path -> typical ms), the
# queue's wake list.
# ARGV: payload, expires ms, now ms (0: Redis's clock), job id, max queued (0: no cap),
# worker slots (0: not fair), horizon ms, path, wake tokens kept.
# Returns how many ms from now the job is due, or false if it is not queued (queue.py).
# The clock holds when the path's next job is due and the spacing that set it, so that
# when the path's typical duration changes, the backlog ahead is re-timed at the new
# spacing rather than kept at the old one.
ENQUEUE = (
    _CLOCK
    + """
local max_queued = tonumber(ARGV[5])
if max_queued > 0 and redis.call('ZCARD', KEYS[2]) >= max_queued then return false end
local now, slots = tonumber(ARGV[3]), tonumber(ARGV[6])
if now == 0 then now = clock_ms() end
local due = now
if slots > 0 then
  -- A path with no duration yet is taken to be a 1 s job, until its first commit.
  local spacing = (tonumber(redis.call('HGET', KEYS[4], ARGV[8])) or 1000) / slots
  local clock = redis.call('HMGET', KEYS[3], 'next', 'spacing')
  local ahead_ms = math.max(0, (tonumber(clock[1]) or now) - now)
  local used = tonumber(clock[2]) or spacing
  if used > 0 then due = now + math.floor(ahead_ms / used * spacing) end
  if due - now > tonumber(ARGV[7]) then return false end
  redis.call('HSET', KEYS[3], 'next', due + spacing, 'spacing', spacing)
  redis.call('PEXPIRE', KEYS[3], math.ceil(due + spacing - now) + 1000)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]) + (due - now))
redis.call('ZADD', KEYS[2], due, ARGV[4])
-- A job due later wakes a worker too: it learns when to look again (TAKE's reply).
if redis.call('RPUSH', KEYS[5], '1') > tonumber(ARGV[9]) then
  redis.call('LTRIM', KEYS[5], -tonumber(ARGV[9]), -1)
end
return due - now
"""
)

# KEYS: queue. ARGV: now ms (0: Redis's clock), most jobs to take, lease ms, and arq's
# in-progress key prefix, job key prefix, retry key prefix, retry key life (s), aborted
# set ('' if the worker does not abort jobs), and the worker's heartbeat key ('1' if it
# keeps none).
# Takes up to that many due jobs for this worker: each gets its in-progress key (as arq's
# own WATCH/MULTI per job sets it), whose value names the worker's heartbeat key and the
# time of the take (`<key>@<ms>`; arq's own value, '1', without one), and is rescored to
# the end of its lease, so that no other worker's TAKE reads it again. Under arq's own
# polling every worker reads every due job, in progress or not, and races the others for
# each with a transaction: the cost of a job grew with the number of workers. Here it
# does not: a worker reads only what it takes.
# A job whose worker dies comes due again as its in-progress key expires, as under arq;
# a request for it finds it lost as soon as the worker's heartbeat has expired
# (`FIND_LOST`, heartbeat.py).
# A due job in progress elsewhere (a plain arq worker on the same queue, which does not
# rescore) is rescored to its in-progress key's end, when it may be taken again anyway.
# Redis's clock (see `_CLOCK`); and the take is sent before the worker's wait for a wake
# token (job_taker.py), so only Redis knows when it runs.
# Each job taken is read as arq's run_job reads it first (arq_worker.PreReadPool): the job,
# its try counted, and whether it was aborted; so it runs with no further round trip.
# Returns {id, score, job or false, try, aborted 0/1, ...} for the jobs taken (their scores
# before the lease), and in how many ms the earliest job left is due (0: now; false: no
# job left), so that the worker knows how long it may sleep.
TAKE = (
    _CLOCK
    + """
local now, most, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if now == 0 then now = clock_ms() end
local marked = ARGV[9]
if marked ~= '1' then marked = marked .. '@' .. now end
-- The first jobs by score, one more than wanted: the one after what is due says when
-- the next is due. (One read: an idle worker's look is two commands with the wait.)
local first = redis.call('ZRANGE', KEYS[1], 0, most, 'WITHSCORES')
local taken, due_in = {}, false
for i = 1, #first, 2 do
  local id, score = first[i], tonumber(first[i + 1])
  if score > now or #taken == 5 * most then
    due_in = math.max(0, score - now)
    break
  end
  local in_progress = ARGV[4] .. id
  if redis.call('SET', in_progress, marked, 'NX', 'PX', lease) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease, id)
    -- What arq's run_job reads first, in its own MULTI: the job, its try (counted), and
    -- whether it was aborted.
    local retry = ARGV[6] .. id
    local tries = redis.call('INCR', retry)
    redis.call('EXPIRE', retry, ARGV[7])
    local aborted = 0
    if ARGV[8] ~= '' then aborted = redis.call('ZREM', ARGV[8], id) end
    taken[#taken + 1] = id
    taken[#taken + 1] = first[i + 1]
    taken[#taken + 1] = redis.call('GET', ARGV[5] .. id)
    taken[#taken + 1] = tries
    taken[#taken + 1] = aborted
  else
    redis.call('ZADD', KEYS[1], 'XX', now + math.max(1, redis.call('PTTL', in_progress)), id)
  end
end
-- Every job read was due, and some were another's: more may be due past them.
if not due_in and #first > 2 * most then due_in = 0 end
return {taken, due_in}
"""
)

# KEYS: job, its in-progress key, queue. ARGV: job id, the prefix of workers' heartbeat
# keys, the job's retry key, how long a lost job's mark lives (ms), how long a heartbeat
# lives (ms).
# Whether the job of a claim is lost (lost.py): gone from the queue (its key evicted, or
# lost in a failover or a restart) and not in progress, or in progress under a worker
# whose heartbeat has expired (killed, frozen) and was taken longer ago than a heartbeat
# lives (a worker that was idle beats again within a second of its take). A job in
# progress under arq's own worker (in-progress value '1': no heartbeat) is never lost
# here: its lease ends it, as ever.
# A lost job is removed from the queue, so that no worker takes it later, and its
# in-progress key stays behind as a mark ('lost') for as long as a claim lives: an
# enqueue of it that comes late is never taken while its claim could still be its own.
# Returns 'queued' or 'running' (not lost), 'gone' or 'silent' (lost: why), or 'lost'
# (found lost before).
FIND_LOST = (
    _CLOCK
    + """
local marked = redis.call('GET', KEYS[2])
local why
if marked == 'lost' then return 'lost' end
if marked then
  local alive, taken = string.match(marked, '^(.+)@(%d+)$')
  if not alive or string.sub(alive, 1, #ARGV[2]) ~= ARGV[2]
    or clock_ms() - tonumber(taken) < tonumber(ARGV[5])
    or redis.call('EXISTS', alive) == 1 then
    return 'running'
  end
  why = 'silent'
elseif redis.call('EXISTS', KEYS[1]) == 1 and redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return 'queued'
else
  why = 'gone'
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], 'lost', 'PX', ARGV[4])
return why
"""
)
