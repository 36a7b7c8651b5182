-- One object of an export is settled: copied, skipped (already there, same size and checksum) or
-- failed. Counted once, however often a resumed export settles it again.
--
-- KEYS: [1] the export's hash, [2] its settled objects (keys.export_done), [3] its kept errors
-- ARGV: [1] the object ("<job_id>:<index>"), [2] copied | skipped | failed, [3] bytes copied,
--       [4] the error as JSON (failed only), [5] errors kept at most
-- Returns: {DONE, status} counted, {REFUSED, status} settled before or the export has ended (a
--          copy that lands after a cancel is not counted), {MISSING} the export is gone.
--          `status` is the export's: a canceled export's worker stops on it.
--- @include "export_status"

local key, done, errors = KEYS[1], KEYS[2], KEYS[3]
local member, outcome, bytes, failure, kept = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local status = redis.call('HGET', key, 'status')
if not status then return {MISSING} end
if EXPORT_FINAL[status] then return {REFUSED, status} end
if redis.call('SADD', done, member) == 0 then return {REFUSED, status} end
redis.call('HINCRBY', key, 'objects_' .. outcome, 1)
if bytes > 0 then redis.call('HINCRBY', key, 'bytes_copied', bytes) end
if outcome == 'failed' and redis.call('LLEN', errors) < kept then redis.call('RPUSH', errors, failure) end
return {DONE, status}
