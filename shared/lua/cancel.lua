-- Cancel a queued or processing job: drop what waits, stop what runs (the dispatcher asks RunPod
-- through the control stream), and hand the job to the packager, which zips what succeeded and
-- archives it.
--
-- KEYS: [1] the job's hash
-- ARGV: [1] job_id, [2] now
-- Returns: {DONE, runs and batches stopped} or {REFUSED, the status that forbids it}
--- @include "fair_share"
--- @include "job_status"

local job_id, now = ARGV[1], tonumber(ARGV[2])
local key = KEYS[1]
local j = redis.call('HMGET', key, 'status', 'project')
if not job_may(j[1], 'canceled') then return {REFUSED, j[1] or ''} end
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
-- Gemini batches of the job: the dispatcher cancels each on Gemini (batches.cancel); a batch still
-- being submitted has no name yet, and its submitter cancels it when it finds the run canceled.
local batches = {}
for _, run_id in ipairs(redis.call('ZRANGE', project_batch_in_flight(j[2]), 0, -1)) do
  if string.sub(run_id, 1, #prefix) == prefix then
    local name = redis.call('HGET', run_key(run_id), 'batch_name')
    redis.call('HSET', run_key(run_id), 'status', 'canceled', 'finished_at', now)
    leave_running(run_id, j[2])
    if name and name ~= '' then table.insert(batches, name) end
  end
end
redis.call('ZREM', project_batch_queue(j[2]), job_id)
for _, waiting in ipairs({RETRY, project_retries(j[2]), BATCH_RETRY}) do
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
if #batches > 0 then redis.call('XADD', CONTROL, '*', 'action', 'cancel_batches', 'names', cjson.encode(batches)) end
-- The packager builds the ZIP of what succeeded, if anything did, and archives the job.
redis.call('XADD', PACKAGING, '*', 'job_id', job_id)
return {DONE, #stopped + #batches}
