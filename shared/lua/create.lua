-- Store a new queued job, all or nothing, in one call: check that its uploads exist and that the
-- project's quotas allow it, resolve its group by name if asked, then write its FIFO sequence
-- number, its hash, the project's and group's indexes and counts, its place in the project's queue
-- (so the 202 answer's job already has one), and publish the news that wakes idle dispatchers.
--
-- KEYS: the job's uploads' records (distinct), then the saved batch it is queued from if any: each
--       must exist (every other key is derived)
-- ARGV: [1] job_id, [2] project, [3] created_at, [4] priority, [5] priority_scale, [6] group_id or
--       '', [7] retry_of or '', [8] the job's fields as a JSON object of strings (one argument:
--       redis-py packs each argument in Python, and some forty of them cost the gateway more than
--       decoding JSON costs Redis), [9] a group name to resolve instead of a group_id, or '',
--       [10] the id for the group if it is new, [11] the job's images, [12] the project's
--       live-images quota (0: none), [13] the project's jobs-per-minute quota (0: none), [14] the
--       dataset the job's inputs come from, or '' (retention keeps a dataset a job named lately),
--       [15] the job's lane: 'batch' waits in its project's batch queue (Gemini batches, no RunPod
--       slot), anything else in its project's queue for RunPod runs, [16] the saved batch the job
--       is queued from, or '', [17] how many of a saved batch's newest jobs it keeps listed
-- Returns: {DONE, sequence number, group id or ''}, {MISSING, {1-based positions in KEYS}},
--          {OVER_QUOTA, 'images', seconds to retry after, images now}, or
--          {OVER_QUOTA, 'jobs_per_minute', seconds to retry after}
--- @include "groups"
--- @include "fair_share"
--- @include "job_status"

local job_id, project, created_at = ARGV[1], ARGV[2], ARGV[3]
local images, per_minute = tonumber(ARGV[11]), tonumber(ARGV[13])
local missing = missing_keys()
if #missing > 0 then return {MISSING, missing} end
local over = over_images_quota(project, images, tonumber(ARGV[12]))
if over then return over end
if per_minute > 0 then
  -- A burst of a minute's worth, then one every 60 / per_minute seconds.
  local wait = take_token(project_submissions(project), per_minute / 60, per_minute, tonumber(created_at))
  if wait > 0 then return {OVER_QUOTA, 'jobs_per_minute', math.ceil(wait)} end
end
mark_uploads_used(created_at)
if ARGV[14] ~= '' then redis.call('ZADD', DATASETS_BY_USE, 'GT', created_at, ARGV[14]) end
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
if ARGV[16] ~= '' then
  local batch_jobs = saved_batch_jobs(ARGV[16])
  redis.call('ZADD', batch_jobs, created_at, job_id)
  redis.call('ZREMRANGEBYRANK', batch_jobs, 0, -tonumber(ARGV[17]) - 1)
end
if ARGV[7] ~= '' then
  redis.call('HSET', job_key(ARGV[7]), 'retried_by', job_id)
  redis.call('ZREM', project_failed_jobs(project), ARGV[7])
end
redis.call('HINCRBY', project_counts(project), 'queued', 1)
redis.call('HINCRBY', JOB_COUNTS, 'queued', 1)
redis.call('INCRBY', project_live_images(project), images)
redis.call('ZADD', project_live_jobs(project), created_at, job_id)
local score = tonumber(ARGV[4]) * tonumber(ARGV[5]) + seq
if ARGV[15] == 'batch' then
  batch_enqueue(project, job_id, score)
else
  enqueue(project, job_id, score)
  activate(project)
end
redis.call('PUBLISH', JOBS_CHANNEL, project)
return {DONE, seq, group_id}
