-- The batch lane's claim: take up to `limit` Gemini batches to submit. Due retries first (a batch
-- that expired or failed, a redo), then the next batch of the head job of the project first in
-- BATCH_READY (round robin between projects; priority, then first in first out, within one). A
-- project that is paused, or whose images in batches in flight would pass its cap, is skipped; it
-- leaves BATCH_READY until a batch of it ends or it is resumed (include/fair_share.lua). Each
-- claimed batch is recorded in flight (BATCH_IN_FLIGHT, due at once: the dispatcher that claimed it
-- submits it, another one does if that one dies) before anything is sent to Gemini, under a claim
-- name of its own, so the batch's name on Gemini is known before it exists.
--
-- KEYS: none (runs, jobs and projects are found as it goes)
-- ARGV: [1] now, [2] the per-project cap of images in batches in flight (0: none), [3] limit,
--       [4] this call's claim prefix, [5] images per batch (the lane's run size)
-- Returns: {DONE, {claimed run_id, attempt, claim triples, flat}}
--- @include "fair_share"
--- @include "job_status"

local now, cap, limit, prefix, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local claimed = {}

local function fits(project, images)
  if redis.call('EXISTS', project_paused(project)) == 1 then return false end
  if cap <= 0 then return true end
  local busy = tonumber(redis.call('GET', project_batch_images(project)) or '0')
  -- A batch larger than the cap still goes, alone: the cap bounds what waits on Gemini, it must
  -- not stop a job for good.
  return busy == 0 or busy + images <= cap
end

local function start(run_id, project, images)
  local claim = prefix .. string.format('%x', #claimed / 3)
  redis.call('HSET', run_key(run_id), 'status', 'dispatched', 'claim', claim, 'dispatched_at', now,
             'lane', 'batch', 'images', images)
  redis.call('HDEL', run_key(run_id), 'batch_name', 'batch_submitting', 'polls')
  redis.call('ZADD', BATCH_IN_FLIGHT, now, run_id)
  redis.call('ZADD', project_batch_in_flight(project), now, run_id)
  redis.call('INCRBY', project_batch_images(project), images)
  local attempt = redis.call('HGET', run_key(run_id), 'attempt')
  claimed[#claimed + 1] = run_id
  claimed[#claimed + 1] = attempt
  claimed[#claimed + 1] = claim
end

-- The images of batch `index` of a job: batches never span two prompts (shared/planning.py).
local function batch_images(per_prompt, index)
  local per = math.ceil(per_prompt / size)
  local chunk = index % per
  return math.min(size, per_prompt - chunk * size)
end

-- Due retries and redos. Bounded per call; one whose project cannot take it now stays due.
local due = redis.call('ZRANGEBYSCORE', BATCH_RETRY, '-inf', now, 'LIMIT', 0, limit * 4)
for _, run_id in ipairs(due) do
  if #claimed / 3 >= limit then break end
  local r = redis.call('HMGET', run_key(run_id), 'project', 'images', 'status')
  if not r[1] or r[3] ~= 'queued' then
    redis.call('ZREM', BATCH_RETRY, run_id)  -- canceled or gone meanwhile
  elseif fits(r[1], tonumber(r[2] or '0')) then
    redis.call('ZREM', BATCH_RETRY, run_id)
    local job_id = redis.call('HGET', run_key(run_id), 'job_id')
    if redis.call('HGET', job_key(job_id), 'status') == 'queued' then set_status(job_id, 'processing', now) end
    start(run_id, r[1], tonumber(r[2] or '0'))
  end
end

-- The next batches of queued work. Each pass either claims, or takes a job or a project out of
-- what it looks at, so the loop is bounded by what it removes.
for _ = 1, 100 do
  if #claimed / 3 >= limit then break end
  local project = redis.call('ZRANGE', BATCH_READY, 0, 0)[1]
  if not project then break end
  local job_id = redis.call('ZRANGE', project_batch_queue(project), 0, 0)[1]
  if not job_id then
    redis.call('ZREM', BATCH_READY, project)
  else
    local key = job_key(job_id)
    local j = redis.call('HMGET', key, 'status', 'runs_total', 'runs_started', 'per_prompt')
    local index = tonumber(j[3] or '0')
    if not LIVE[j[1] or ''] or index >= tonumber(j[2] or '0') then
      redis.call('ZREM', project_batch_queue(project), job_id)
    else
      local images = batch_images(tonumber(j[4] or '1'), index)
      if not fits(project, images) then
        redis.call('ZREM', BATCH_READY, project)
      else
        redis.call('HSET', key, 'runs_started', index + 1)
        if index + 1 >= tonumber(j[2]) then redis.call('ZREM', project_batch_queue(project), job_id) end
        if j[1] == 'queued' then
          redis.call('HSET', key, 'started_at', string.format('%.6f', now))
          set_status(job_id, 'processing', now)
        end
        local run_id = job_id .. '.' .. index
        redis.call('HSET', run_key(run_id), 'job_id', job_id, 'project', project, 'attempt', 1)
        start(run_id, project, images)
        -- To the back of the round: every project with batches gets its turn.
        redis.call('ZADD', BATCH_READY, 'XX', now, project)
      end
    end
  end
end
return {DONE, claimed}
