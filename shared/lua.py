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
    "project_jobs": keys.project_jobs,
    "project_retries": keys.project_retries,
    "project_runs_waiting": keys.project_runs_waiting,
    "project_live_images": keys.project_live_images,
    "project_submissions": keys.project_submissions,
    "group_jobs": keys.group_jobs,
    "group_key": keys.group,
    "project_groups": keys.project_groups,
}
_CONSTANTS = {
    "RUNNING": keys.RUNNING,
    "RETRY": keys.RETRY_QUEUE,
    "READY": keys.READY,
    "PASSES": keys.PASSES,
    "VTIME": keys.VIRTUAL_TIME,
    "WEIGHTS": keys.WEIGHTS,
    "BACKLOG": keys.BACKLOG,
    "BACKLOG_WEIGHT": keys.BACKLOG_WEIGHT,
    "JOB_COUNTS": keys.JOB_COUNTS,
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

-- Token bucket in a hash: `rate` tokens a second up to `size`. Takes one and returns 0, or returns
-- the seconds until one is there (nothing taken).
local function take_token(bucket, rate, size, now)
  local b = redis.call('HMGET', bucket, 'tokens', 'ts')
  local tokens = tonumber(b[1] or size)
  local elapsed = math.max(0, now - tonumber(b[2] or now))
  tokens = math.min(size, tokens + elapsed * rate)
  if tokens < 1 then
    redis.call('HSET', bucket, 'tokens', tokens, 'ts', now)
    return (1 - tokens) / rate
  end
  redis.call('HSET', bucket, 'tokens', tokens - 1, 'ts', now)
  return 0
end

-- Fair share between projects (stride scheduling). A project that may start a run now sits in
-- READY, scored by its pass; the claim serves the lowest pass and advances it by 1 / weight, so
-- projects with work get runs in proportion to their weights whatever priorities they choose, and
-- each claim costs O(log projects). A project (re)joins at the virtual time (the pass served
-- last) or at the pass it left with, whichever is later: time spent idle, paused or at its own cap
-- earns no credit to spend later.
local function weight(project)
  return tonumber(redis.call('HGET', WEIGHTS, project) or '1')
end

local function has_work(project)
  return redis.call('ZCARD', project_retries(project)) > 0 or redis.call('ZCARD', project_queue(project)) > 0
end

-- Into READY if it has work and is not paused (its own cap is checked when it is served).
local function wake(project)
  if redis.call('ZSCORE', READY, project) then return end
  if redis.call('EXISTS', project_paused(project)) == 1 or not has_work(project) then return end
  local vtime = tonumber(redis.call('GET', VTIME) or '0')
  local pass = tonumber(redis.call('HGET', PASSES, project) or '0')
  redis.call('ZADD', READY, math.max(vtime, pass), project)
end

-- The project has runs to start: it counts in the backlog's weight (ETAs) and is woken.
local function activate(project)
  if redis.call('HEXISTS', BACKLOG, project) == 0 then
    local w = weight(project)
    redis.call('HSET', BACKLOG, project, w)
    redis.call('INCRBYFLOAT', BACKLOG_WEIGHT, w)
  end
  wake(project)
end

-- Out of READY, keeping its pass; with no work left, out of the backlog too.
local function set_aside(project, pass)
  redis.call('ZREM', READY, project)
  redis.call('HSET', PASSES, project, pass)
  if not has_work(project) then
    local w = redis.call('HGET', BACKLOG, project)
    if w then
      redis.call('HDEL', BACKLOG, project)
      redis.call('INCRBYFLOAT', BACKLOG_WEIGHT, -tonumber(w))
    end
  end
end

-- The operator's bound on a project's images in queued and processing jobs: nil while `more` fits,
-- else {2, 'images', seconds to retry after (one run's time: a finished run makes room), images now}.
local function over_images_quota(project, more, quota)
  if quota <= 0 then return nil end
  local live = tonumber(redis.call('GET', project_live_images(project)) or '0')
  if live + more <= quota then return nil end
  local retry_after = math.ceil(tonumber(redis.call('HGET', RUN_SECONDS, 'avg') or '30'))
  return {2, 'images', retry_after, live}
end

-- An event for live views (SSE), bounded in length.
local function emit(job_id, kind)
  local j = redis.call('HMGET', job_key(job_id), 'project', 'status', 'images_total', 'images_succeeded',
                       'images_failed', 'runs_total', 'runs_done')
  redis.call('XADD', EVENTS, 'MAXLEN', '~', 100000, '*', 'job_id', job_id, 'type', kind,
             'project', j[1] or '', 'status', j[2] or '', 'images_total', j[3] or '0',
             'images_succeeded', j[4] or '0', 'images_failed', j[5] or '0',
             'runs_total', j[6] or '0', 'runs_done', j[7] or '0')
end

local LIVE = {queued = true, processing = true}

-- A job completed after `seconds`: the project's hourly figures count it, so its metrics read
-- a few fields an hour, never the jobs themselves.
local function count_completion(project, seconds, now)
  local hourly, hour = project_hourly(project), math.floor(now / 3600)
  redis.call('HINCRBY', hourly, hour .. ':jobs', 1)
  redis.call('HINCRBYFLOAT', hourly, hour .. ':seconds', seconds)
  local low = tonumber(redis.call('HGET', hourly, hour .. ':min_seconds') or '')
  if not low or seconds < low then redis.call('HSET', hourly, hour .. ':min_seconds', seconds) end
  local high = tonumber(redis.call('HGET', hourly, hour .. ':max_seconds') or '')
  if not high or seconds > high then redis.call('HSET', hourly, hour .. ':max_seconds', seconds) end
end

-- Into or out of its project's queue (`score` given: into it), keeping the project's count of runs
-- waiting to start in step. Returns whether the queue changed.
local function enqueue(project, job_id, score)
  local j = redis.call('HMGET', job_key(job_id), 'runs_total', 'runs_started')
  local left = math.max(0, tonumber(j[1] or '0') - tonumber(j[2] or '0'))
  if redis.call('ZADD', project_queue(project), 'NX', score, job_id) == 0 then return false end
  redis.call('INCRBY', project_runs_waiting(project), left)
  return true
end

local function dequeue(project, job_id)
  local j = redis.call('HMGET', job_key(job_id), 'runs_total', 'runs_started')
  local left = math.max(0, tonumber(j[1] or '0') - tonumber(j[2] or '0'))
  if redis.call('ZREM', project_queue(project), job_id) == 0 then return false end
  redis.call('DECRBY', project_runs_waiting(project), left)
  return true
end

-- The one way a job's status changes: keeps the per-project and global counts, the live-images
-- quota, the finished index and the user-webhook notifications in step with it.
local function set_status(job_id, new, now)
  local key = job_key(job_id)
  local j = redis.call('HMGET', key, 'status', 'project', 'webhook_url', 'redo_images', 'images_total', 'created_at')
  if j[1] == new then return end
  redis.call('HSET', key, 'status', new)
  local counts = project_counts(j[2])
  if j[1] then
    redis.call('HINCRBY', counts, j[1], -1)
    redis.call('HINCRBY', JOB_COUNTS, j[1], -1)
  end
  redis.call('HINCRBY', counts, new, 1)
  redis.call('HINCRBY', JOB_COUNTS, new, 1)
  -- A job counts all its images, a redone one only those redone.
  local quota_images = tonumber(j[4] or j[5] or '0')
  if LIVE[j[1]] and not LIVE[new] then
    redis.call('DECRBY', project_live_images(j[2]), quota_images)
  elseif LIVE[new] and not LIVE[j[1]] then
    redis.call('INCRBY', project_live_images(j[2]), quota_images)
  end
  if FINAL[new] then
    redis.call('HSET', key, 'completed_at', now)
    if new == 'completed' then count_completion(j[2], now - tonumber(j[6] or now), now) end
    if j[3] and j[3] ~= '' then redis.call('XADD', NOTIFY, '*', 'job_id', job_id) end
  elseif FINAL[j[1]] then
    redis.call('HDEL', key, 'completed_at')
  end
  emit(job_id, 'status')
end

-- A run is no longer in flight: its slot, and its project's, are free again.
local function leave_running(run_id, project)
  redis.call('ZREM', RUNNING, run_id)
  redis.call('ZREM', project_running(project), run_id)
  wake(project)
end
"""
)


def _script(body: str) -> str:
    return PRELUDE + body


# First record RunPod's ids for runs started since the last call (each only if that attempt is
# still the run's own, not canceled or requeued), then claim up to `limit` runs to start, one at a
# time, each only if the global cap, the project's cap, the pause switch and the dispatch rate
# allow. Retries and redos whose time has come move to their project's own retry queue first. Each
# claim serves the project with the lowest pass in READY (fair share, above): its due retries
# first, then the head of its queue (lowest priority number, first in first out among equals).
# One call for both parts: a round trip less per run.
# Returns {claimed run_id, attempt pairs, flat (fewer than `limit`: nothing more can start now),
# a 1 or 0 per started run (0: no longer live, the caller stops it on RunPod)}.
# ARGV: cap, now, deadline, project_cap (0 = none), rpm (0 = unlimited), limit,
#       then run_id, attempt, runpod_id triples of the started runs
RECORD_STARTED_AND_CLAIM = _script("""
local cap, now, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local project_cap, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])

local recorded = {}
for i = 7, #ARGV, 3 do
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

-- Bounded per call, so one call stays short for Redis; the rest move in the next.
local due = redis.call('ZRANGEBYSCORE', RETRY, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 100)
for i = 1, #due, 2 do
  redis.call('ZREM', RETRY, due[i])
  local project = redis.call('HGET', run_key(due[i]), 'project')
  if project then
    redis.call('ZADD', project_retries(project), due[i + 1], due[i])
    activate(project)
  end
end

local function open(project)
  if redis.call('EXISTS', project_paused(project)) == 1 then return false end
  return project_cap <= 0 or redis.call('ZCARD', project_running(project)) < project_cap
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
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then return nil end
    local j = redis.call('HMGET', job_key(head), 'status', 'runs_total', 'runs_started')
    if LIVE[j[1]] and tonumber(j[3] or '0') < tonumber(j[2] or '0') then return head end
    dequeue(project, head)
  end
  return nil
end

-- The project's next run, started: a due retry (`retry`), else the next planned run of `job_id`.
-- `order` counts the claims of this call: jobs started in one call get started_at a microsecond
-- apart, so that started_at still orders jobs as the scheduler took them.
local function start_next(project, retry, job_id, order)
  if retry then
    redis.call('ZREM', project_retries(project), retry)
    start(retry, project)
    return {retry, redis.call('HGET', run_key(retry), 'attempt')}
  end
  local key = job_key(job_id)
  local j = redis.call('HMGET', key, 'status', 'runs_total', 'runs_started')
  local index = tonumber(j[3] or '0')
  redis.call('HSET', key, 'runs_started', index + 1)
  redis.call('DECR', project_runs_waiting(project))
  if index + 1 >= tonumber(j[2]) then redis.call('ZREM', project_queue(project), job_id) end
  if j[1] == 'queued' then
    -- Formatted here: Lua would print the number with 14 digits, 0.1 ms at today's epoch.
    redis.call('HSET', key, 'started_at', string.format('%.6f', now + order / 1e6))
    set_status(job_id, 'processing', now)
  end
  local run_id = job_id .. '.' .. index
  redis.call('HSET', run_key(run_id), 'job_id', job_id, 'project', project, 'attempt', 1)
  start(run_id, project)
  return {run_id, '1'}
end

local function claim(order)
  if redis.call('ZCARD', RUNNING) >= cap then return nil end
  -- Projects found paused, at their cap or out of work leave READY as they are met (each is put
  -- back by the change that lets it start again), so this loop is bounded by what it removes.
  for _ = 1, 100 do
    local head = redis.call('ZRANGE', READY, 0, 0, 'WITHSCORES')
    if not head[1] then return nil end
    local project, pass = head[1], tonumber(head[2])
    local retry, job_id = nil, nil
    if open(project) then
      retry = redis.call('ZRANGE', project_retries(project), 0, 0)[1]
      if not retry then job_id = live_head(project) end
    end
    if retry or job_id then
      if rpm > 0 and take_token(BUCKET, rpm / 60, math.max(1, rpm / 12), now) > 0 then return nil end
      local run = start_next(project, retry, job_id, order)
      redis.call('SET', VTIME, pass)
      local next_pass = pass + 1 / weight(project)
      if has_work(project) and open(project) then
        redis.call('ZADD', READY, next_pass, project)
      else
        set_aside(project, next_pass)
      end
      return run
    end
    set_aside(project, pass)
  end
  return nil
end

local claimed = {}
for order = 0, tonumber(ARGV[6]) - 1 do
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
enqueue(j[2], ARGV[1], tonumber(j[3]) * tonumber(ARGV[2]) + tonumber(j[4]))
activate(j[2])
return 1
""")

# Pause (ARGV[2] = 1) or resume (0) a project: running runs finish, no new one starts until resumed.
# ARGV: project, paused
SET_PAUSED = _script("""
local project = ARGV[1]
if ARGV[2] == '1' then
  redis.call('SET', project_paused(project), '1')
  local pass = redis.call('ZSCORE', READY, project)
  if pass then set_aside(project, tonumber(pass)) end
else
  redis.call('DEL', project_paused(project))
  wake(project)
end
return 1
""")

# The operator's fair-share weights replace the old ones; the backlog's total weight is summed anew.
# ARGV: project, weight pairs
SET_WEIGHTS = _script("""
redis.call('DEL', WEIGHTS)
for i = 1, #ARGV, 2 do redis.call('HSET', WEIGHTS, ARGV[i], ARGV[i + 1]) end
local backlog = redis.call('HKEYS', BACKLOG)
local total = 0
for _, project in ipairs(backlog) do
  local w = weight(project)
  redis.call('HSET', BACKLOG, project, w)
  total = total + w
end
redis.call('SET', BACKLOG_WEIGHT, total)
return #backlog
""")

# A run index entry left behind by a script that settled the run: drop it, freeing its slot.
# ARGV: run_id, project
FORGET_RUN = _script("""
leave_running(ARGV[1], ARGV[2])
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
local j = redis.call('HMGET', key, 'status', 'project')
if j[1] ~= 'queued' and j[1] ~= 'processing' then return {0, j[1] or ''} end
dequeue(j[2], job_id)
local prefix = job_id .. '.'
local stopped = {}
for _, run_id in ipairs(redis.call('ZRANGE', project_running(j[2]), 0, -1)) do
  if string.sub(run_id, 1, #prefix) == prefix then
    local runpod_id = redis.call('HGET', run_key(run_id), 'runpod_id')
    redis.call('HSET', run_key(run_id), 'status', 'canceled', 'finished_at', now)
    leave_running(run_id, j[2])
    if runpod_id and runpod_id ~= '' then table.insert(stopped, runpod_id) end
  end
end
for _, waiting in ipairs({RETRY, project_retries(j[2])}) do
  for _, run_id in ipairs(redis.call('ZRANGE', waiting, 0, -1)) do
    if string.sub(run_id, 1, #prefix) == prefix then
      redis.call('HSET', run_key(run_id), 'status', 'canceled', 'finished_at', now)
      redis.call('ZREM', waiting, run_id)
    end
  end
end
redis.call('HSET', key, 'canceled_at', now)
set_status(job_id, 'canceled', now)
if #stopped > 0 then redis.call('XADD', CONTROL, '*', 'action', 'cancel', 'runpod_ids', cjson.encode(stopped)) end
-- The packager builds the ZIP of what succeeded, if anything did, and archives the job.
redis.call('XADD', PACKAGING, '*', 'job_id', job_id)
return {1, #stopped}
""")

# A final job's records leave Redis once they are in its archive object: its config field and its
# images hash (UNLINK: freed off the main thread, whatever its size). Its summary hash stays, marked
# archived; its run records are unlinked by the caller in batches (they expire anyway). A job changed
# since the caller read what it archived (a redo adds runs) is left as it is.
# ARGV: job_id, the runs_total the archive was read at. Returns 1 if archived now.
ARCHIVE = _script("""
local key = job_key(ARGV[1])
local j = redis.call('HMGET', key, 'status', 'archived', 'runs_total')
if not FINAL[j[1]] or j[2] or j[3] ~= ARGV[2] then return 0 end
redis.call('HDEL', key, 'config')
redis.call('UNLINK', images_key(ARGV[1]))
-- Written anew: a hash that once held a long value (the config) keeps a table encoding, three
-- times the size of the compact one a new hash of short values gets.
local summary = redis.call('HGETALL', key)
redis.call('DEL', key)
redis.call('HSET', key, 'archived', 1, unpack(summary))
return 1
""")

# The last step of bringing an archived job's records back (its images hash was written first):
# its config, and the job is no longer archived. ARGV: job_id, config. Returns 1 if restored now.
RESTORE = _script("""
local key = job_key(ARGV[1])
if not redis.call('HGET', key, 'archived') then return 0 end
redis.call('HSET', key, 'config', ARGV[2])
redis.call('HDEL', key, 'archived')
return 1
""")

# Regenerate some images of a finished job in place: forget their outcomes, queue redo runs
# (each with its slots), and reopen the job; its ZIP is rebuilt when they are done.
# Over the project's live-images quota nothing changes: {2, 'images', retry after seconds}; nor
# while the job is archived: {3, 'archived'} (the caller restores it first).
# ARGV: job_id, now, max live images (0 = no quota), number of slots, then for each redo run:
#       run_id, slots ("3,7"); indices to forget are the slots.
REDO = _script("""
local job_id, now = ARGV[1], tonumber(ARGV[2])
local key = job_key(job_id)
local j = redis.call('HMGET', key, 'status', 'project', 'archived')
if j[1] ~= 'completed' and j[1] ~= 'failed' then return {0, j[1] or ''} end
if j[3] then return {3, 'archived'} end
local over = over_images_quota(j[2], tonumber(ARGV[4]), tonumber(ARGV[3]))
if over then return over end
redis.call('HSET', key, 'redo_images', ARGV[4])
local succeeded, failed = 0, 0
for i = 5, #ARGV, 2 do
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
redis.call('HINCRBY', key, 'runs_total', (#ARGV - 4) / 2)
redis.call('HDEL', key, 'zip_key', 'zip_bytes', 'error')
set_status(job_id, 'processing', now)
return {1, (#ARGV - 4) / 2}
""")


# A status view's queue figures in one round trip, read at one instant, and with them the job's
# `fields` (so a status read is one call; written into the script, since sending two dozen names as
# arguments costs the gateway more CPU than the rest of the call). Under fair share a job waits only
# for its own project's work, so every figure is the project's, and each costs O(log n) at most:
# its jobs ahead (a rank), counted only while the job has no run started, and the runs ahead of it:
# the project's runs in flight and due retries, plus its jobs ahead at the average runs left per
# queued job (from the count of runs waiting the scripts keep). The project's share of the capacity
# is its weight over the weight of every project with work. Runs are counted only when an average
# run time exists: without one there is no ETA to compute.
# ARGV: job_id
# Returns {the fields' values, score or nil, jobs ahead, runs ahead, average run seconds or nil,
# the project's share of the capacity (0 to 1) as a string}
def queue_figures(fields: Sequence[str] = ()) -> str:
    if not all(re.fullmatch(r"\w+", name) for name in fields):
        raise ValueError(f"not plain field names: {fields}")
    names = ", ".join(f"'{name}'" for name in fields)
    return _script(
        f"local FIELDS = {{{names}}}\n"
        + """
local job_id = ARGV[1]
local key = job_key(job_id)
local record = {}
if #FIELDS > 0 then record = redis.call('HMGET', key, unpack(FIELDS)) end
local j = redis.call('HMGET', key, 'project', 'status', 'runs_started')
if not LIVE[j[2]] then return {record, false, 0, 0, false, '1'} end
local project = j[1]
local queue = project_queue(project)
local score = redis.call('ZSCORE', queue, job_id)
local avg = redis.call('HGET', RUN_SECONDS, 'avg')
local ahead, runs = 0, 0
if score and tonumber(j[3] or '0') == 0 then
  ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. score)
  if avg then
    runs = redis.call('ZCARD', project_running(project)) + redis.call('ZCARD', project_retries(project))
    local waiting = tonumber(redis.call('GET', project_runs_waiting(project)) or '0')
    runs = runs + math.floor(ahead * waiting / redis.call('ZCARD', queue) + 0.5)
  end
end
local w = weight(project)
local share = w / math.max(w, tonumber(redis.call('GET', BACKLOG_WEIGHT) or '0'))
return {record, score, ahead, runs, avg, tostring(share)}
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
# Over one of the operator's quotas nothing is written either.
# ARGV: job_id, project, created_at, priority, priority_scale, group_id or '', retry_of or '', the
# job's fields as a JSON object of strings (one argument: redis-py packs each argument in Python, and
# some forty of them cost the gateway more than decoding JSON costs Redis), a group name to resolve
# (instead of a group_id) or '', the id for the group if it is new, images of the job, max live
# images of the project (0 = no quota), jobs per minute of the project (0 = no quota).
# Returns {1, sequence number, group id or ''}, {0, {1-based positions of the missing keys}}, or
# {2, 'images' or 'jobs_per_minute', seconds to retry after, images now (for 'images')}.
CREATE = _script(
    GROUP_FUNCTIONS
    + """
local job_id, project, created_at = ARGV[1], ARGV[2], ARGV[3]
local images, per_minute = tonumber(ARGV[11]), tonumber(ARGV[13])
local missing = missing_keys()
if #missing > 0 then return {0, missing} end
local over = over_images_quota(project, images, tonumber(ARGV[12]))
if over then return over end
if per_minute > 0 then
  -- A burst of a minute's worth, then one every 60 / per_minute seconds.
  local wait = take_token(project_submissions(project), per_minute / 60, per_minute, tonumber(created_at))
  if wait > 0 then return {2, 'jobs_per_minute', math.ceil(wait)} end
end
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
redis.call('HINCRBY', JOB_COUNTS, 'queued', 1)
redis.call('INCRBY', project_live_images(project), images)
enqueue(project, job_id, tonumber(ARGV[4]) * tonumber(ARGV[5]) + seq)
activate(project)
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


# Trim from a stream what every one of its consumer groups is done with: the entries before the
# oldest one a group has not acknowledged and not after the last one it was handed. Never an entry
# some group has not read, nor one read and not acknowledged (a dead consumer's, waiting to be
# claimed). Whole stream nodes only (MINID ~): cheap, and what is left is trimmed by a later call.
# KEYS: stream. Returns the number of entries trimmed.
TRIM_ACKNOWLEDGED = """
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function earlier(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local floor = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  local bound = group['last-delivered-id']
  local pending = redis.call('XPENDING', KEYS[1], group.name)
  if pending[1] > 0 and earlier(pending[2], bound) then bound = pending[2] end
  if not floor or earlier(bound, floor) then floor = bound end
end
if not floor then return 0 end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', floor)
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
