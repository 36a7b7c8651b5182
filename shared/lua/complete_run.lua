-- A run's attempt is final: store each image's outcome, count it once, and when it was the job's
-- last run hand the job to the packager. Its cost (Gemini tokens priced by model and lane, RunPod
-- execution time) is added to the job, the project's hourly figures and the project's spend of the
-- day and month; a project whose spend reaches its budget is paused (include/budgets.lua).
--
-- KEYS: [1] the run's hash, [2] the job's hash, [3] the job's images hash
-- ARGV: [1] run_id, [2] job_id, [3] attempt, [4] now, [5] the run's status (succeeded or failed),
--       [6] images succeeded, [7] images failed, [8] tokens, [9] the claim it is the outcome of,
--       [10] lane (realtime or batch), [11] prompt tokens, [12] output tokens, [13] Gemini cost
--       (micro-USD), [14] RunPod execution ms, [15] RunPod cost (micro-USD), [16] the day's period
--       id, [17] its end (unix s), [18] the month's period id, [19] its end,
--       then index, record (JSON) pairs
-- Returns: {DONE, project paused for budget by this outcome or ''}, or {REFUSED} (that claim is no
--          longer in flight: an outcome delivered again, or one of an execution whose claim Redis lost)
--- @include "fair_share"
--- @include "job_status"
--- @include "budgets"

local run_id, job_id, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local rkey, jkey = KEYS[1], KEYS[2]
local r = redis.call('HMGET', rkey, 'attempt', 'status', 'dispatched_at', 'project', 'claim')
if r[1] ~= ARGV[3] or (r[5] or '') ~= ARGV[9] or not run_may(r[2], ARGV[5]) then return {REFUSED} end
redis.call('HSET', rkey, 'status', ARGV[5], 'finished_at', now)
redis.call('EXPIRE', rkey, 7 * 86400)
leave_running(run_id, r[4])
for i = 20, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('HINCRBY', jkey, 'images_succeeded', ARGV[6])
redis.call('HINCRBY', jkey, 'images_failed', ARGV[7])
redis.call('HINCRBY', jkey, 'tokens', ARGV[8])
local hour = math.floor(now / 3600)
local hourly = project_hourly(r[4])
redis.call('HINCRBY', hourly, hour .. ':succeeded', ARGV[6])
redis.call('HINCRBY', hourly, hour .. ':failed', ARGV[7])
redis.call('HINCRBY', hourly, hour .. ':tokens', ARGV[8])
-- The cost, in integers (tokens, ms, micro-dollars): HINCRBY adds them exactly.
local lane, gemini, runpod_ms, runpod = ARGV[10], tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
redis.call('HINCRBY', jkey, 'prompt_tokens', ARGV[11])
redis.call('HINCRBY', jkey, 'output_tokens', ARGV[12])
redis.call('HINCRBY', jkey, 'gemini_micros', gemini)
redis.call('HINCRBY', jkey, 'runpod_ms', runpod_ms)
redis.call('HINCRBY', jkey, 'runpod_micros', runpod)
if gemini > 0 then redis.call('HINCRBY', hourly, hour .. ':gemini_micros', gemini) end
if runpod > 0 then redis.call('HINCRBY', hourly, hour .. ':runpod_micros', runpod) end
local paused = ''
if gemini + runpod > 0 and add_spend(r[4], gemini + runpod, ARGV[16], tonumber(ARGV[17]), ARGV[18], tonumber(ARGV[19])) then
  paused = r[4]
end
local done = redis.call('HINCRBY', jkey, 'runs_done', 1)
if lane ~= 'batch' and ARGV[5] == 'succeeded' and r[3] then
  -- Exponential moving averages of a RunPod run's time, from its dispatch (ETAs) and as RunPod
  -- ran it (quotes: what RunPod bills); a Gemini batch's turnaround is the batch lane's own figure.
  local took = now - tonumber(r[3])
  local avg = tonumber(redis.call('HGET', RUN_SECONDS, 'avg') or took)
  redis.call('HSET', RUN_SECONDS, 'avg', avg + 0.2 * (took - avg))
  if runpod_ms > 0 then
    local ran = runpod_ms / 1000
    local ran_avg = tonumber(redis.call('HGET', RUN_SECONDS, 'execution_avg') or ran)
    redis.call('HSET', RUN_SECONDS, 'execution_avg', ran_avg + 0.2 * (ran - ran_avg))
  end
end
local j = redis.call('HMGET', jkey, 'status', 'runs_total')
if done >= tonumber(j[2]) and job_may(j[1], 'packaging') then
  set_status(job_id, 'packaging', now)
  redis.call('XADD', PACKAGING, '*', 'job_id', job_id)
else
  emit(job_id, 'progress')
end
return {DONE, paused}
