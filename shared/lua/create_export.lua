-- Record a queued export and publish it for the packager, unless its project has as many exports
-- queued or running as it may: one project's exports never fill every export worker.
--
-- KEYS: [1] the export's hash, [2] the project's exports (keys.project_exports),
--       [3] the project's unfinished exports (keys.project_active_exports)
-- ARGV: [1] export_id, [2] created_at, [3] unfinished exports a project may have,
--       [4...] the hash's field/value pairs
-- Returns: {DONE} or {OVER_QUOTA, unfinished exports of the project}

local key, index, active = KEYS[1], KEYS[2], KEYS[3]
local export_id, created_at, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local unfinished = redis.call('SCARD', active)
if unfinished >= limit then return {OVER_QUOTA, unfinished} end
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
redis.call('SADD', active, export_id)
redis.call('ZADD', index, created_at, export_id)
redis.call('ZADD', EXPORTS_BY_TIME, created_at, export_id)
redis.call('XADD', EXPORTS, '*', 'export_id', export_id)
return {DONE}
