-- A run's attempt is final: store each image's outcome, count it once, and when it was the job's
-- last run hand the job to the packager.
--
-- KEYS: [1] the run's hash, [2] the job's hash, [3] the job's images hash
-- ARGV: [1] run_id, [2] job_id, [3] attempt, [4] now, [5] the run's status (succeeded or failed),
--       [6] images succeeded, [7] images failed, [8] tokens, [9] the claim it is the outcome of,
--       then index, record (JSON) pairs
-- Returns: {DONE}, or {REFUSED} (that claim is no longer in flight: an outcome delivered again, or
--          one of an execution whose claim Redis lost)
--- @include "fair_share"
--- @include "job_status"

local run_id, job_id, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
local rkey, jkey = KEYS[1], KEYS[2]
local r = redis.call('HMGET', rkey, 'attempt', 'status', 'dispatched_at', 'project', 'claim')
if r[1] ~= ARGV[3] or (r[5] or '') ~= ARGV[9] or not run_may(r[2], ARGV[5]) then return {REFUSED} end
redis.call('HSET', rkey, 'status', ARGV[5], 'finished_at', now)
redis.call('EXPIRE', rkey, 7 * 86400)
leave_running(run_id, r[4])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
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
if done >= tonumber(j[2]) and job_may(j[1], 'packaging') then
  set_status(job_id, 'packaging', now)
  redis.call('XADD', PACKAGING, '*', 'job_id', job_id)
else
  emit(job_id, 'progress')
end
return {DONE}
