-- Objects of an export are settled, a batch at a time: copied, skipped (already there, same size
-- and checksum) or failed. Each is counted once, however often a resumed export settles it again.
--
-- KEYS: [1] the export's hash, [2] its settled objects (keys.export_done), [3] its kept errors
-- ARGV: [1] errors kept at most, then four per object: the object ("<job_id>:<index>"),
--       copied | skipped | failed, bytes copied, the error as JSON (failed only, else "")
-- Returns: {DONE, status, counted...} one flag per object, 1 counted now, 0 settled before;
--          {REFUSED, status} the export has ended (a copy that lands after a cancel is not
--          counted); {MISSING} the export is gone.
--          `status` is the export's: a canceled export's worker stops on it.
--- @include "export_status"

local key, done, errors = KEYS[1], KEYS[2], KEYS[3]
local kept = tonumber(ARGV[1])
local status = redis.call('HGET', key, 'status')
if not status then return {MISSING} end
if EXPORT_FINAL[status] then return {REFUSED, status} end
local reply = {DONE, status}
local counted = {copied = 0, skipped = 0, failed = 0}
local bytes = 0
for i = 2, #ARGV, 4 do
  local member, outcome = ARGV[i], ARGV[i + 1]
  if redis.call('SADD', done, member) == 1 then
    counted[outcome] = counted[outcome] + 1
    bytes = bytes + tonumber(ARGV[i + 2])
    if outcome == 'failed' and redis.call('LLEN', errors) < kept then redis.call('RPUSH', errors, ARGV[i + 3]) end
    reply[#reply + 1] = 1
  else
    reply[#reply + 1] = 0
  end
end
-- In a fixed order: the same writes on every replica.
for _, outcome in ipairs({'copied', 'skipped', 'failed'}) do
  if counted[outcome] > 0 then redis.call('HINCRBY', key, 'objects_' .. outcome, counted[outcome]) end
end
if bytes > 0 then redis.call('HINCRBY', key, 'bytes_copied', bytes) end
return reply
