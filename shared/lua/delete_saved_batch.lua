-- Delete a saved batch of the project, unless a job queued from it is still unfinished: that job's
-- progress is what the batch's views (and the queue API's cancel and redo) find it by.
--
-- KEYS: none (the batch's hash, its jobs and the project's index are derived)
-- ARGV: [1] batch id, [2] project
-- Returns: {DONE}, {MISSING} (no such batch in the project) or {REFUSED, unfinished job ids}

local batch_id, project = ARGV[1], ARGV[2]
local batch = saved_batch_key(batch_id)
if redis.call('HGET', batch, 'project') ~= project then return {MISSING} end
local unfinished = {}
for _, job_id in ipairs(redis.call('ZRANGE', saved_batch_jobs(batch_id), 0, -1)) do
  local status = redis.call('HGET', job_key(job_id), 'status')
  if status and not FINAL[status] then unfinished[#unfinished + 1] = job_id end
end
if #unfinished > 0 then return {REFUSED, unfinished} end
redis.call('DEL', batch, saved_batch_jobs(batch_id))
redis.call('ZREM', project_saved_batches(project), batch_id)
return {DONE}
