-- An export ends: completed, failed or canceled. Its event goes on the project's event stream and,
-- when it has a webhook_url, a message to the notifier; the set of settled objects goes (the
-- counts keep what it told), and so does its place among its project's unfinished exports.
--
-- KEYS: [1] the export's hash, [2] its settled objects (keys.export_done)
-- ARGV: [1] export_id, [2] completed | failed | canceled, [3] now, [4] error ('' for none),
--       [5] objects_total ('' to keep it)
-- Returns: {DONE}, {REFUSED, status} when it had ended already, {MISSING} when it is gone
--- @include "export_status"

local key, done = KEYS[1], KEYS[2]
local export_id, status, now, error, total = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local current = redis.call('HGET', key, 'status')
if not current then return {MISSING} end
if EXPORT_FINAL[current] then return {REFUSED, current} end
redis.call('HSET', key, 'status', status, 'completed_at', now)
if error ~= '' then redis.call('HSET', key, 'error', error) end
if total ~= '' then redis.call('HSET', key, 'objects_total', total) end
redis.call('DEL', done)
redis.call('SREM', project_active_exports(redis.call('HGET', key, 'project')), export_id)
emit_export(key, export_id)
local webhook = redis.call('HGET', key, 'webhook_url')
if webhook and webhook ~= '' then redis.call('XADD', NOTIFY, '*', 'export_id', export_id) end
return {DONE}
