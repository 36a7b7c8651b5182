-- Fair share between projects and the queues it serves: shared by the scripts that change
-- what a project may start.

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

-- The batch lane (jobs made through Gemini's Batch API). A project with batches left to submit
-- sits in BATCH_READY; the claim serves the lowest score and moves the project to the back
-- (round robin). A paused project, or one at its cap of images in batches, leaves it as it is met;
-- the change that lets it go on (a batch of it ends, resume, a new job, a retry coming due) puts it
-- back. Its batches never take a RunPod slot: none of this touches RUNNING or READY.
local function batch_wake(project)
  if redis.call('EXISTS', project_paused(project)) == 1 then return end
  if redis.call('ZCARD', project_batch_queue(project)) == 0 then return end
  redis.call('ZADD', BATCH_READY, 'NX', 0, project)
end

local function batch_enqueue(project, job_id, score)
  redis.call('ZADD', project_batch_queue(project), 'NX', score, job_id)
  batch_wake(project)
end

-- A batch is no longer in flight: its images no longer count against its project's cap.
local function leave_batch(run_id, project)
  redis.call('ZREM', project_batch_in_flight(project), run_id)
  local images = tonumber(redis.call('HGET', run_key(run_id), 'images') or '0')
  if images > 0 then redis.call('DECRBY', project_batch_images(project), images) end
  batch_wake(project)
end

-- A run is no longer in flight: its slot, and its project's, are free again (a batch: its images).
local function leave_running(run_id, project)
  redis.call('ZREM', RUNNING, run_id)
  redis.call('ZREM', project_running(project), run_id)
  if redis.call('ZREM', BATCH_IN_FLIGHT, run_id) == 1 then leave_batch(run_id, project) end
  wake(project)
end

-- Where a run waits to start again: the batch lane's retries, or the RunPod runs'.
local function retry_queue(run_id)
  if redis.call('HGET', run_key(run_id), 'lane') == 'batch' then return BATCH_RETRY end
  return RETRY
end

-- The pause switch: on, runs in flight finish and none starts in either lane until it is off (an
-- operator's pause, set_paused.lua, or a budget's, include/budgets.lua).
local function pause_project(project)
  redis.call('SET', project_paused(project), '1')
  local pass = redis.call('ZSCORE', READY, project)
  if pass then set_aside(project, tonumber(pass)) end
  redis.call('ZREM', BATCH_READY, project)
end

local function resume_project(project)
  redis.call('DEL', project_paused(project))
  wake(project)
  batch_wake(project)
end
