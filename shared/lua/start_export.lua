-- A packager takes up an export (first time, or after the one before it stopped): count the
-- attempt, mark it running with the objects it will settle, and say so on the event stream.
--
-- KEYS: [1] the export's hash
-- ARGV: [1] export_id, [2] now, [3] objects_total
-- Returns: {DONE, attempts (this one included)}, {REFUSED, status} when it already ended, or
--          {MISSING} when it no longer exists (purged)
--- @include "export_status"

local key, export_id, now, total = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local status = redis.call('HGET', key, 'status')
if not status then return {MISSING} end
if EXPORT_FINAL[status] then return {REFUSED, status} end
local attempts = redis.call('HINCRBY', key, 'attempts', 1)
redis.call('HSET', key, 'status', 'running', 'objects_total', total)
if redis.call('HEXISTS', key, 'started_at') == 0 then redis.call('HSET', key, 'started_at', now) end
if status ~= 'running' then emit_export(key, export_id) end
return {DONE, attempts}
