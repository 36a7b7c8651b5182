-- The dispatcher's pass, in one call: first record RunPod's ids for the runs started since the last
-- call (each only if that attempt is still the run's own, not canceled or requeued), then claim up
-- to `limit` runs to start, one at a time, each only while the global cap, the project's cap, the
-- pause switches (the project's, and the upstream hold of the whole queue) and the dispatch rate
-- allow. Retries and redos whose time has come move to their
-- project's own retry queue first. Each claim serves the project with the lowest pass in READY
-- (fair share, include/fair_share.lua): its due retries first, then the head of its queue (lowest
-- priority number, first in first out among equals). One call for both parts: a round trip less
-- per run.
--
-- Each claim gets a name of its own (`claim`): ARGV[7], random per call, and the claim's order in
-- the call. A claim lost with Redis's last writes (a crash, a failover) is made again under another
-- name, so the RunPod execution it started cannot be taken for the new one: its webhook, its
-- outcome and its objects all carry the old name (docs/architecture.md, "Durability").
--
-- KEYS: none (runs, jobs and projects are found as it goes)
-- ARGV: [1] global cap, [2] now, [3] the webhook deadline of the runs started now, [4] per-project
--       cap (0: none), [5] runs per minute (0: unlimited), [6] limit, [7] this call's claim prefix,
--       then run_id, attempt, claim, runpod_id of each run started since the last call
-- Returns: {DONE, {claimed run_id, attempt, claim triples, flat (fewer than `limit`: nothing more
--          can start now)}, {a 1 or 0 per started run given (0: no longer live, the caller stops it
--          on RunPod)}}
--- @include "fair_share"
--- @include "job_status"

local cap, now, deadline = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local project_cap, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])

local recorded = {}
for i = 8, #ARGV, 4 do
  local key = run_key(ARGV[i])
  local r = redis.call('HMGET', key, 'attempt', 'claim', 'status')
  -- Also once that attempt's outcome is in (a fast run's webhook can beat /run's answer): the id
  -- stays on record. Not for an attempt canceled or superseded meanwhile: that one is stopped.
  if r[1] == ARGV[i + 1] and r[2] == ARGV[i + 2] and r[3] ~= 'canceled' and r[3] ~= 'queued' then
    redis.call('HSET', key, 'runpod_id', ARGV[i + 3])
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

local function start(run_id, project, claim)
  redis.call('ZADD', RUNNING, deadline, run_id)
  redis.call('ZADD', project_running(project), deadline, run_id)
  redis.call('HSET', run_key(run_id), 'status', 'dispatched', 'runpod_id', '', 'dispatched_at', now, 'claim', claim)
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
  local claim = ARGV[7] .. string.format('%x', order)
  if retry then
    redis.call('ZREM', project_retries(project), retry)
    start(retry, project, claim)
    return {retry, redis.call('HGET', run_key(retry), 'attempt'), claim}
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
  start(run_id, project, claim)
  return {run_id, '1', claim}
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

-- Every run would fail the same way upstream (Gemini's daily quota, a refused key): start none.
-- A hold with a time (a daily quota resets at midnight Pacific) ends by itself here.
local hold_until = redis.call('HGET', HOLD, 'until')
if hold_until then
  local ends = tonumber(hold_until) or 0
  if ends > 0 and ends <= now then
    redis.call('DEL', HOLD)
  else
    return {DONE, {}, recorded}
  end
end

local claimed = {}
for order = 0, tonumber(ARGV[6]) - 1 do
  local one = claim(order)
  if not one then break end
  claimed[#claimed + 1] = one[1]
  claimed[#claimed + 1] = one[2]
  claimed[#claimed + 1] = one[3]
end
return {DONE, claimed, recorded}
