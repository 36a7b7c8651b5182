-- Store a saved batch (a job's definition, queued later by POST /api/batches/{id}/jobs), unless
-- the project already keeps as many as it may.
--
-- KEYS: none (the batch's hash and the project's index are derived)
-- ARGV: [1] batch id, [2] project, [3] created_at, [4] the most saved batches a project keeps
--       (0: no limit), [5] the batch's fields as a JSON object of strings
-- Returns: {DONE} or {OVER_QUOTA, saved batches now}

local batch_id, project, created_at, most = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local index = project_saved_batches(project)
if most > 0 then
  local saved = redis.call('ZCARD', index)
  if saved >= most then return {OVER_QUOTA, saved} end
end
local fields = {}
for name, value in pairs(cjson.decode(ARGV[5])) do
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end
redis.call('HSET', saved_batch_key(batch_id), unpack(fields))
redis.call('ZADD', index, created_at, batch_id)
return {DONE}
