"""Lua scripts: every state change that must be atomic across replicas happens in one of these.

Scripts reach per-job, per-run and per-project keys by name; the Lua functions that build those
names are generated from shared.keys, so key names still live in one place (tests compare them).
This assumes one Redis (or a single-slot deployment), not Redis Cluster.
"""

import re
from collections.abc import Callable, Sequence

from shared import keys

FINAL = ("completed", "failed", "canceled")


def _lua_key_function(name: str, builder: Callable[[str], str]) -> str:
    head, _, tail = builder("\0").partition("\0")
    return f"local function {name}(x) return '{head}' .. x .. '{tail}' end\n"


_KEY_FUNCTIONS = {
    "job_key": keys.job,
    "images_key": keys.job_images,
    "run_key": keys.run,
    "project_queue": keys.project_queue,
    "project_running": keys.project_running,
    "project_paused": keys.project_paused,
    "project_counts": keys.project_counts,
    "project_hourly": keys.project_hourly,
    "project_finished": keys.project_finished,
    "project_jobs": keys.project_jobs,
    "group_jobs": keys.group_jobs,
    "group_key": keys.group,
    "project_groups": keys.project_groups,
}
_CONSTANTS = {
    "RUNNING": keys.RUNNING,
    "RETRY": keys.RETRY_QUEUE,
    "PROJECTS": keys.QUEUE_PROJECTS,
    "LAST_SERVED": keys.LAST_SERVED,
    "SERVE_SEQ": keys.SERVE_SEQUENCE,
    "BUCKET": keys.DISPATCH_BUCKET,
    "RUN_SECONDS": keys.RUN_SECONDS,
    "EVENTS": keys.EVENTS_STREAM,
    "PACKAGING": keys.PACKAGING_STREAM,
    "NOTIFY": keys.NOTIFICATIONS_STREAM,
    "CONTROL": keys.CONTROL_STREAM,
    "JOB_SEQ": keys.JOB_SEQUENCE,
    "JOBS": keys.JOBS_STREAM,
    "UPLOADS_BY_USE": keys.UPLOADS_BY_USE,
    "UPLOADS_PURGING": keys.UPLOADS_PURGING,
}

PRELUDE = (
    "".join(_lua_key_function(name, builder) for name, builder in _KEY_FUNCTIONS.items())
    + "".join(f"local {name} = '{value}'\n" for name, value in _CONSTANTS.items())
    + """
local FINAL = {completed = true, failed = true, canceled = true}

-- An event for live views (SSE), bounded in length.
local function emit(job_id, kind)
  local j = redis.call('HMGET', job_key(job_id), 'project', 'status', 'images_total', 'images_succeeded',
                       'images_failed', 'runs_total', 'runs_done')
  redis.call('XADD', EVENTS, 'MAXLEN', '~', 100000, '*', 'job_id', job_id, 'type', kind,
             'project', j[1] or '', 'status', j[2] or '', 'images_total', j[3] or '0',
             'images_succeeded', j[4] or '0', 'images_failed', j[5] or '0',
             'runs_total', j[6] or '0', 'runs_done', j[7] or '0')
end

-- The one way a job's status changes: keeps the per-project counts, the finished index and the
-- user-webhook notifications in step with it.
local function set_status(job_id, new, now)
  local key = job_key(job_id)
  local j = redis.call('HMGET', key, 'status', 'project', 'webhook_url')
  if j[1] == new then return end
  redis.call('HSET', key, 'status', new)
  local counts = project_counts(j[2])
  if j[1] then redis.call('HINCRBY', counts, j[1], -1) end
  redis.call('HINCRBY', counts, new, 1)
  if FINAL[new] then
    redis.call('HSET', key, 'completed_at', now)
    redis.call('ZADD', project_finished(j[2]), now, job_id)
    if j[3] and j[3] ~= '' then redis.call('XADD', NOTIFY, '*', 'job_id', job_id) end
  elseif FINAL[j[1]] then
    redis.call('HDEL', key, 'completed_at')
    redis.call('ZREM', project_finished(j[2]), job_id)
  end
  emit(job_id, 'status')
end

local function leave_running(run_id, project)
  redis.call('ZREM', RUNNING, run_id)
  redis.call('ZREM', project_running(project), run_id)
end
"""
)


def _script(body: str) -> str:
    return PRELUDE + body


# First record RunPod's ids for runs started since the last call (each only if that attempt is
# still the run's own, not canceled or requeued), then take up to `limit` runs to start, one at a
# time, each only if the global cap, the project's cap, the pause switch and the dispatch rate
# allow. Due retries and redos go first; then, among projects with queued jobs, the one whose head
# job has the lowest priority, the least recently served first among equals. One call for both: a
# round trip less per run.
# Returns {claimed run_id, attempt pairs, flat (fewer than `limit`: nothing more can start now),
# a 1 or 0 per started run (0: no longer live, the caller stops it on RunPod)}.
# ARGV: cap, now, deadline, project_cap (0 = none), rpm (0 = unlimited), priority_scale, limit,
#       then run_id, attempt, runpod_id triples of the started runs
ACQUIRE = _script("""
local cap, now, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local project_cap, rpm, scale = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])

local recorded = {}
for i = 8, #ARGV, 3 do
  local key = run_key(ARGV[i])
  local r = redis.call('HMGET', key, 'attempt', 'status')
  -- Also once that attempt's outcome is in (a fast run's webhook can beat /run's answer): the id
  -- stays on record. Not for an attempt canceled or superseded meanwhile: that one is stopped.
  if r[1] == ARGV[i + 1] and r[2] ~= 'canceled' and r[2] ~= 'queued' then
    redis.call('HSET', key, 'runpod_id', ARGV[i + 2])
    recorded[#recorded + 1] = 1
  else
    recorded[#recorded + 1] = 0
  end
end

local function open(project)
  if redis.call('EXISTS', project_paused(project)) == 1 then return false end
  return project_cap <= 0 or redis.call('ZCARD', project_running(project)) < project_cap
end

-- Token bucket: rpm/60 tokens a second, a burst of five seconds' worth.
local function take_token()
  if rpm <= 0 then return true end
  local b = redis.call('HMGET', BUCKET, 'tokens', 'ts')
  local size = math.max(1, rpm / 12)
  local tokens = tonumber(b[1] or size)
  local elapsed = math.max(0, now - tonumber(b[2] or now))
  tokens = math.min(size, tokens + elapsed * rpm / 60)
  if tokens < 1 then
    redis.call('HSET', BUCKET, 'tokens', tokens, 'ts', now)
    return false
  end
  redis.call('HSET', BUCKET, 'tokens', tokens - 1, 'ts', now)
  return true
end

local function start(run_id, project)
  redis.call('ZADD', RUNNING, deadline, run_id)
  redis.call('ZADD', project_running(project), deadline, run_id)
  redis.call('HSET', run_key(run_id), 'status', 'dispatched', 'runpod_id', '', 'dispatched_at', now)
end

-- The head job of a project queue that still has runs to hand out (dead heads are dropped).
local function live_head(project)
  local queue = project_queue(project)
  for _ = 1, 100 do
    local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
    if not head[1] then return nil end
    local j = redis.call('HMGET', job_key(head[1]), 'status', 'runs_total', 'runs_started')
    if (j[1] == 'queued' or j[1] == 'processing') and tonumber(j[3] or '0') < tonumber(j[2] or '0') then
      return head[1], tonumber(head[2])
    end
    redis.call('ZREM', queue, head[1])
  end
  return nil
end

-- `order` counts the claims of this call: jobs started in one call get started_at a microsecond
-- apart, so that started_at still orders jobs as the scheduler took them.
local function claim(order)
  if redis.call('ZCARD', RUNNING) >= cap then return nil end
  for _, run_id in ipairs(redis.call('ZRANGEBYSCORE', RETRY, '-inf', now, 'LIMIT', 0, 50)) do
    local r = redis.call('HMGET', run_key(run_id), 'project', 'attempt')
    if open(r[1]) then
      if not take_token() then return nil end
      redis.call('ZREM', RETRY, run_id)
      start(run_id, r[1])
      return {run_id, r[2]}
    end
  end

  local best, best_job, best_priority, best_served
  for _, project in ipairs(redis.call('SMEMBERS', PROJECTS)) do
    local job_id, score = live_head(project)
    if not job_id then
      redis.call('SREM', PROJECTS, project)
    elseif open(project) then
      local priority = math.floor(score / scale)
      local served = tonumber(redis.call('HGET', LAST_SERVED, project) or '0')
      if not best or priority < best_priority or (priority == best_priority and served < best_served) then
        best, best_job, best_priority, best_served = project, job_id, priority, served
      end
    end
  end
  if not best then return nil end
  if not take_token() then return nil end

  local key = job_key(best_job)
  local j = redis.call('HMGET', key, 'status', 'runs_total', 'runs_started')
  local index = tonumber(j[3] or '0')
  redis.call('HSET', key, 'runs_started', index + 1)
  if index + 1 >= tonumber(j[2]) then redis.call('ZREM', project_queue(best), best_job) end
  redis.call('HSET', LAST_SERVED, best, redis.call('INCR', SERVE_SEQ))
  if j[1] == 'queued' then
    -- Formatted here: Lua would print the number with 14 digits, 0.1 ms at today's epoch.
    redis.call('HSET', key, 'started_at', string.format('%.6f', now + order / 1e6))
    set_status(best_job, 'processing', now)
  end
  local run_id = best_job .. '.' .. index
  redis.call('HSET', run_key(run_id), 'job_id', best_job, 'project', best, 'attempt', 1)
  start(run_id, best)
  return {run_id, '1'}
end

local claimed = {}
for order = 0, tonumber(ARGV[7]) - 1 do
  local one = claim(order)
  if not one then break end
  claimed[#claimed + 1] = one[1]
  claimed[#claimed + 1] = one[2]
end
return {claimed, recorded}
""")

# Put an accepted job in its project's queue (a redelivery changes nothing).
# ARGV: job_id, priority_scale
ADMIT = _script("""
local key = job_key(ARGV[1])
local j = redis.call('HMGET', key, 'status', 'project', 'priority', 'seq', 'runs_total', 'runs_started')
if j[1] ~= 'queued' or tonumber(j[6] or '0') >= tonumber(j[5] or '0') then return 0 end
local score = tonumber(j[3]) * tonumber(ARGV[2]) + tonumber(j[4])
redis.call('ZADD', project_queue(j[2]), 'NX', score, ARGV[1])
redis.call('SADD', PROJECTS, j[2])
return 1
""")

# Change a job's priority while it still has runs waiting to start.
# ARGV: job_id, priority, priority_scale
SET_PRIORITY = _script("""
local key = job_key(ARGV[1])
local j = redis.call('HMGET', key, 'status', 'project', 'seq', 'runs_total', 'runs_started')
if (j[1] ~= 'queued' and j[1] ~= 'processing') or tonumber(j[5] or '0') >= tonumber(j[4] or '0') then
  return 0
end
redis.call('HSET', key, 'priority', ARGV[2])
local score = tonumber(ARGV[2]) * tonumber(ARGV[3]) + tonumber(j[3])
redis.call('ZADD', project_queue(j[2]), 'XX', score, ARGV[1])
emit(ARGV[1], 'status')
return 1
""")

# Put a run back to be started again after `ready_at` (a failed attempt, or a /run call that
# never reached RunPod). ARGV[4] = 1 makes it a new attempt.
# ARGV: run_id, attempt, ready_at, new_attempt, reason
REQUEUE = _script("""
local key = run_key(ARGV[1])
local r = redis.call('HMGET', key, 'attempt', 'status', 'project')
if r[1] ~= ARGV[2] or r[2] ~= 'dispatched' then return 0 end
local attempt = tonumber(ARGV[2]) + tonumber(ARGV[4])
redis.call('HSET', key, 'attempt', attempt, 'status', 'queued', 'runpod_id', '', 'last_error', ARGV[5])
leave_running(ARGV[1], r[3])
redis.call('ZADD', RETRY, ARGV[3], ARGV[1])
return attempt
""")

# A run's attempt is final: store each image's outcome, count it once, and when it was the
# job's last run hand the job to the packager.
# ARGV: run_id, job_id, attempt, now, run_status, succeeded, failed, tokens, then (index, record) pairs
COMPLETE = _script("""
local run_id, job_id, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local rkey, jkey = run_key(run_id), job_key(job_id)
local r = redis.call('HMGET', rkey, 'attempt', 'status', 'dispatched_at', 'project')
if r[1] ~= ARGV[3] or r[2] ~= 'dispatched' then return 0 end
redis.call('HSET', rkey, 'status', ARGV[5], 'finished_at', now)
redis.call('EXPIRE', rkey, 7 * 86400)
leave_running(run_id, r[4])
for i = 9, #ARGV, 2 do redis.call('HSET', images_key(job_id), ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', jkey, 'images_succeeded', ARGV[6])
redis.call('HINCRBY', jkey, 'images_failed', ARGV[7])
redis.call('HINCRBY', jkey, 'tokens', ARGV[8])
local hour = math.floor(now / 3600)
local hourly = project_hourly(r[4])
redis.call('HINCRBY', hourly, hour .. ':succeeded', ARGV[6])
redis.call('HINCRBY', hourly, hour .. ':failed', ARGV[7])
redis.call('HINCRBY', hourly, hour .. ':tokens', ARGV[8])
local done = redis.call('HINCRBY', jkey, 'runs_done', 1)
if ARGV[5] == 'succeeded' and r[3] then
  -- Exponential moving average of run time, for ETAs.
  local took = now - tonumber(r[3])
  local avg = tonumber(redis.call('HGET', RUN_SECONDS, 'avg') or took)
  redis.call('HSET', RUN_SECONDS, 'avg', avg + 0.2 * (took - avg))
end
local j = redis.call('HMGET', jkey, 'status', 'runs_total')
if done >= tonumber(j[2]) and j[1] == 'processing' then
  set_status(job_id, 'packaging', now)
  redis.call('XADD', PACKAGING, '*', 'job_id', job_id)
else
  emit(job_id, 'progress')
end
return 1
""")

# Compare-and-set of a job's status, with extra fields.
# ARGV: job_id, from_status, to_status, now, then field/value pairs ('' deletes the field)
TRANSITION = _script("""
local key = job_key(ARGV[1])
if redis.call('HGET', key, 'status') ~= ARGV[2] then return 0 end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', key, ARGV[i]) else redis.call('HSET', key, ARGV[i], ARGV[i + 1]) end
end
set_status(ARGV[1], ARGV[3], tonumber(ARGV[4]))
return 1
""")

# Cancel a queued or processing job: drop what waits, stop what runs (the dispatcher asks RunPod
# through the control stream), keep what succeeded and package it.
# ARGV: job_id, now.  Returns {1, runs stopped} or {0, current status}.
CANCEL = _script("""
local job_id, now = ARGV[1], tonumber(ARGV[2])
local key = job_key(job_id)
local j = redis.call('HMGET', key, 'status', 'project', 'images_succeeded')
if j[1] ~= 'queued' and j[1] ~= 'processing' then return {0, j[1] or ''} end
redis.call('ZREM', project_queue(j[2]), job_id)
local prefix = job_id .. '.'
local stopped = {}
for _, run_id in ipairs(redis.call('ZRANGE', RUNNING, 0, -1)) do
  if string.sub(run_id, 1, #prefix) == prefix then
    local runpod_id = redis.call('HGET', run_key(run_id), 'runpod_id')
    redis.call('HSET', run_key(run_id), 'status', 'canceled', 'finished_at', now)
    leave_running(run_id, j[2])
    if runpod_id and runpod_id ~= '' then table.insert(stopped, runpod_id) end
  end
end
for _, run_id in ipairs(redis.call('ZRANGE', RETRY, 0, -1)) do
  if string.sub(run_id, 1, #prefix) == prefix then
    redis.call('HSET', run_key(run_id), 'status', 'canceled', 'finished_at', now)
    redis.call('ZREM', RETRY, run_id)
  end
end
redis.call('HSET', key, 'canceled_at', now)
set_status(job_id, 'canceled', now)
if #stopped > 0 then redis.call('XADD', CONTROL, '*', 'action', 'cancel', 'runpod_ids', cjson.encode(stopped)) end
if tonumber(j[3] or '0') > 0 then redis.call('XADD', PACKAGING, '*', 'job_id', job_id) end
return {1, #stopped}
""")

# Regenerate some images of a finished job in place: forget their outcomes, queue redo runs
# (each with its slots), and reopen the job; its ZIP is rebuilt when they are done.
# ARGV: job_id, now, then for each redo run: run_id, slots ("3,7"); indices to forget are the slots.
REDO = _script("""
local job_id, now = ARGV[1], tonumber(ARGV[2])
local key = job_key(job_id)
local j = redis.call('HMGET', key, 'status', 'project')
if j[1] ~= 'completed' and j[1] ~= 'failed' then return {0, j[1] or ''} end
local succeeded, failed = 0, 0
for i = 3, #ARGV, 2 do
  for index in string.gmatch(ARGV[i + 1], '%d+') do
    local old = redis.call('HGET', images_key(job_id), index)
    if old then
      if cjson.decode(old)['status'] == 'succeeded' then succeeded = succeeded + 1 else failed = failed + 1 end
      redis.call('HDEL', images_key(job_id), index)
    end
  end
  redis.call('HSET', run_key(ARGV[i]), 'job_id', job_id, 'project', j[2], 'attempt', 1, 'status', 'queued',
             'slots', ARGV[i + 1])
  redis.call('ZADD', RETRY, now, ARGV[i])
end
redis.call('HINCRBY', key, 'images_succeeded', 0 - succeeded)  -- never -0: Redis refuses it
redis.call('HINCRBY', key, 'images_failed', 0 - failed)
redis.call('HINCRBY', key, 'runs_total', (#ARGV - 2) / 2)
redis.call('HDEL', key, 'zip_key', 'zip_bytes', 'error')
set_status(job_id, 'processing', now)
return {1, (#ARGV - 2) / 2}
""")


# A status view's queue figures in one round trip, read at one instant, and with them the job's
# `fields` (so a status read is one call; written into the script, since sending two dozen names as
# arguments costs the gateway more CPU than the rest of the call). Jobs ahead are those with a
# lower score in any project's queue, at most ARGV[2] per project (past that the position is "at
# least" that far back), counted only while the job has no run started. Their runs left to start
# are summed only when an average run time exists: without one there is no ETA to compute.
# ARGV: job_id, max jobs ahead per project
# Returns {the fields' values, score or nil, jobs ahead, runs ahead (in flight + left of the jobs
# ahead), average run seconds or nil}
def queue_figures(fields: Sequence[str] = ()) -> str:
    if not all(re.fullmatch(r"\w+", name) for name in fields):
        raise ValueError(f"not plain field names: {fields}")
    names = ", ".join(f"'{name}'" for name in fields)
    return _script(
        f"local FIELDS = {{{names}}}\n"
        + """
local job_id, limit = ARGV[1], tonumber(ARGV[2])
local key = job_key(job_id)
local record = {}
if #FIELDS > 0 then record = redis.call('HMGET', key, unpack(FIELDS)) end
local j = redis.call('HMGET', key, 'project', 'status', 'runs_started')
if j[2] ~= 'queued' and j[2] ~= 'processing' then return {record, false, 0, 0, false} end
local score = redis.call('ZSCORE', project_queue(j[1]), job_id)
local avg = redis.call('HGET', RUN_SECONDS, 'avg')
local ahead, runs = 0, 0
if score and tonumber(j[3] or '0') == 0 then
  runs = redis.call('ZCARD', RUNNING)
  for _, other in ipairs(redis.call('SMEMBERS', PROJECTS)) do
    local queue = project_queue(other)
    local n = math.min(redis.call('ZCOUNT', queue, '-inf', '(' .. score), limit)
    ahead = ahead + n
    if avg and n > 0 then
      -- The first n of the queue are the jobs ahead. SORT BY nosort keeps a sorted set's order and
      -- reads their hash fields in C: with 100 jobs ahead, half the time of one HMGET per job from Lua.
      local o = redis.call('SORT', queue, 'BY', 'nosort', 'LIMIT', 0, n,
                           'GET', job_key('*') .. '->runs_total', 'GET', job_key('*') .. '->runs_started')
      for i = 1, #o, 2 do runs = runs + (tonumber(o[i]) or 0) - (tonumber(o[i + 1]) or 0) end
    end
  end
end
return {record, score, ahead, runs, avg}
"""
    )


# Lua functions of the scripts that write jobs and groups.
GROUP_FUNCTIONS = """
-- Positions (1-based) of the KEYS that do not exist: a job's uploads must, before anything is written.
local function missing_keys()
  local found = 0
  for i = 1, #KEYS, 1000 do  -- in slices: unpack() is limited to a few thousand values
    found = found + redis.call('EXISTS', unpack(KEYS, i, math.min(i + 999, #KEYS)))
  end
  local missing = {}
  if found < #KEYS then  -- KEYS are distinct, so EXISTS counted each once
    for i = 1, #KEYS do
      if redis.call('EXISTS', KEYS[i]) == 0 then missing[#missing + 1] = i end
    end
  end
  return missing
end

-- The uploads a new job names (KEYS, their record keys) were used now: retention keeps them.
local function mark_uploads_used(now)
  local args = {}
  for i = 1, #KEYS do
    local upload_id = string.match(KEYS[i], ':upload:([^:]+)$')
    if upload_id then
      args[#args + 1] = now
      args[#args + 1] = upload_id
    end
    if #args >= 1000 or (i == #KEYS and #args > 0) then
      redis.call('ZADD', UPLOADS_BY_USE, 'GT', unpack(args))
      args = {}
    end
  end
end

-- The id of the project's group of that name, created if there is none. Atomic, so two jobs naming
-- a new group at once end up in one group, and no name ever maps to an id whose hash is not written.
local function group_by_name(project, name, new_id, now)
  local existing = redis.call('HGET', project_groups(project), name)
  if existing then return existing end
  redis.call('HSET', project_groups(project), name, new_id)
  redis.call('HSET', group_key(new_id), 'id', new_id, 'name', name, 'project', project, 'created_at', now)
  return new_id
end
"""

# What a job names: a group id of this project, else the project's group of that name, created if
# there is none; but first, that the keys the job needs (its uploads) exist, else nothing changes.
# KEYS: the required keys (distinct); ARGV: id or name, project, new group id, now.
# Returns {1, group id, name}, or {0, {1-based positions of the missing keys}}.
RESOLVE_GROUP = _script(
    GROUP_FUNCTIONS
    + """
local missing = missing_keys()
if #missing > 0 then return {0, missing} end
mark_uploads_used(ARGV[4])
local g = redis.call('HMGET', group_key(ARGV[1]), 'project', 'name')
if g[1] == ARGV[2] then return {1, ARGV[1], g[2]} end
return {1, group_by_name(ARGV[2], ARGV[1], ARGV[3], ARGV[4]), ARGV[1]}
"""
)

# The project's group of that name, created if there is none (POST /api/groups).
# ARGV: name, new group id, project, now. Returns {1 if it was created, group id}.
CREATE_GROUP = _script(
    GROUP_FUNCTIONS
    + """
local group_id = group_by_name(ARGV[3], ARGV[1], ARGV[2], ARGV[4])
return {group_id == ARGV[2] and 1 or 0, group_id}
"""
)

# Store a new queued job and publish it for the dispatchers, all or nothing, in one call: after
# checking its uploads exist (KEYS, as above) and resolving its group by name if asked, its FIFO
# sequence number, its hash, the project's and group's indexes and counts, its place in the queue
# (so the 202 answer's job already has one; the dispatchers' admit() is then a no-op) and the
# stream message that wakes them.
# ARGV: job_id, project, created_at, priority, priority_scale, group_id or '', retry_of or '', the
# job's fields as a JSON object of strings (one argument: redis-py packs each argument in Python, and
# some forty of them cost the gateway more than decoding JSON costs Redis), a group name to resolve
# (instead of a group_id) or '', the id for the group if it is new.
# Returns {1, sequence number, group id or ''}, or {0, {1-based positions of the missing keys}}.
CREATE = _script(
    GROUP_FUNCTIONS
    + """
local job_id, project, created_at = ARGV[1], ARGV[2], ARGV[3]
local missing = missing_keys()
if #missing > 0 then return {0, missing} end
mark_uploads_used(created_at)
local group_id = ARGV[6]
if ARGV[9] ~= '' then group_id = group_by_name(project, ARGV[9], ARGV[10], created_at) end
local seq = redis.call('INCR', JOB_SEQ)
local fields = {'seq', seq}
if group_id ~= '' then fields = {'seq', seq, 'group_id', group_id} end
for name, value in pairs(cjson.decode(ARGV[8])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', job_key(job_id), unpack(fields))
redis.call('ZADD', project_jobs(project), created_at, job_id)
if group_id ~= '' then redis.call('ZADD', group_jobs(group_id), created_at, job_id) end
if ARGV[7] ~= '' then redis.call('HSET', job_key(ARGV[7]), 'retried_by', job_id) end
redis.call('HINCRBY', project_counts(project), 'queued', 1)
redis.call('ZADD', project_queue(project), tonumber(ARGV[4]) * tonumber(ARGV[5]) + seq, job_id)
redis.call('SADD', PROJECTS, project)
redis.call('XADD', JOBS, '*', 'job_id', job_id)
return {1, seq, group_id}
"""
)


# Forget the consumers of a group that hold nothing and have not read for ARGV[2] ms: replicas that
# died or were scaled away, whose names would otherwise pile up in XINFO with every restart. The
# pending check and the delete are one step, so a consumer that just took a message is never
# forgotten with it. A live consumer forgotten while idle is recreated by its next read.
# KEYS: stream. ARGV: group, idle_ms, the caller's own consumer name. Returns the forgotten names.
FORGET_CONSUMERS = """
local forgotten = {}
for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #flat, 2 do consumer[flat[i]] = flat[i + 1] end
  if consumer.pending == 0 and consumer.idle > tonumber(ARGV[2]) and consumer.name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer.name)
    forgotten[#forgotten + 1] = consumer.name
  end
end
return forgotten
"""


# How long retention's claim to delete an upload's object holds off a new upload of the same content.
UPLOAD_PURGE_LEASE_SECONDS = 600

# An upload is being sent (again): note the use, so retention keeps it, unless retention is deleting
# its object right now. Then the caller waits (0) and asks again, or its PUT could land before that
# DELETE and be lost. A deletion claimed longer ago than the lease was abandoned (its purge died):
# the caller takes the id back and must PUT (2), since the object may be gone.
# ARGV: upload_id, now, lease_seconds. Returns 1 (go on), 2 (go on and PUT) or 0 (wait).
USE_UPLOAD = _script("""
local claimed = redis.call('ZSCORE', UPLOADS_PURGING, ARGV[1])
local answer = 1
if claimed then
  if tonumber(claimed) + tonumber(ARGV[3]) > tonumber(ARGV[2]) then return 0 end
  redis.call('ZREM', UPLOADS_PURGING, ARGV[1])
  answer = 2
end
redis.call('ZADD', UPLOADS_BY_USE, 'GT', ARGV[2], ARGV[1])
return answer
""")

# Retention claims an upload for deletion if nothing used it since the cutoff: its records go (so no
# new job can name it), and the id is noted in UPLOADS_PURGING until its object is deleted. Called
# again for an id already noted (a purge that died), it renews the claim.
# ARGV: upload_id, cutoff, now. Returns 1 if claimed.
CLAIM_UPLOAD = _script("""
local upload_id, cutoff, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local used = redis.call('ZSCORE', UPLOADS_BY_USE, upload_id)
if used and tonumber(used) > cutoff then return 0 end
for _, record in ipairs(redis.call('SMEMBERS', KEYS[1])) do redis.call('DEL', record) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', UPLOADS_BY_USE, upload_id)
redis.call('ZADD', UPLOADS_PURGING, now, upload_id)
return 1
""")
