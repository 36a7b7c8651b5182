-- Regenerate some images of a finished job in place: forget their outcomes, queue redo runs (each
-- with its slots), and reopen the job; its ZIP is rebuilt when they are done. A batch-lane job's
-- redo runs are Gemini batches (the batch lane's retries), the others RunPod runs.
--
-- KEYS: [1] the job's hash, [2] its images hash
-- ARGV: [1] job_id, [2] now, [3] the project's live-images quota (0: none), [4] images to redo,
--       then for each redo run: run_id, its slots ("3,7"); the slots' outcomes are forgotten
-- Returns: {DONE, redo runs}, {REFUSED, the status that forbids it}, {ARCHIVED} (restore the job
--          first), or {OVER_QUOTA, 'images', seconds to retry after, images now}
--- @include "job_status"

local job_id, now = ARGV[1], tonumber(ARGV[2])
local key = KEYS[1]
local j = redis.call('HMGET', key, 'status', 'project', 'archived', 'lane')
if not FINAL[j[1] or ''] or not job_may(j[1], 'processing') then return {REFUSED, j[1] or ''} end
if j[3] then return {ARCHIVED} end
local over = over_images_quota(j[2], tonumber(ARGV[4]), tonumber(ARGV[3]))
if over then return over end
redis.call('HSET', key, 'redo_images', ARGV[4])
local succeeded, failed = 0, 0
for i = 5, #ARGV, 2 do
  for index in string.gmatch(ARGV[i + 1], '%d+') do
    local old = redis.call('HGET', KEYS[2], index)
    if old then
      if cjson.decode(old)['status'] == 'succeeded' then succeeded = succeeded + 1 else failed = failed + 1 end
      redis.call('HDEL', KEYS[2], index)
    end
  end
  redis.call('HSET', run_key(ARGV[i]), 'job_id', job_id, 'project', j[2], 'attempt', 1, 'status', 'queued',
             'slots', ARGV[i + 1])
  if j[4] == 'batch' then
    -- Made again as a Gemini batch of its own: images counts it against the project's batch cap.
    local _, commas = string.gsub(ARGV[i + 1], ',', '')
    redis.call('HSET', run_key(ARGV[i]), 'lane', 'batch', 'images', commas + 1)
    redis.call('ZADD', BATCH_RETRY, now, ARGV[i])
  else
    redis.call('ZADD', RETRY, now, ARGV[i])
  end
end
redis.call('HINCRBY', key, 'images_succeeded', 0 - succeeded)  -- never -0: Redis refuses it
redis.call('HINCRBY', key, 'images_failed', 0 - failed)
redis.call('HINCRBY', key, 'runs_total', (#ARGV - 4) / 2)
redis.call('HDEL', key, 'zip_key', 'zip_bytes', 'error')
set_status(job_id, 'processing', now)
return {DONE, (#ARGV - 4) / 2}
