-- Compare-and-set of a job's status, with extra fields: what the packager does when a ZIP is
-- written (completed) or nothing succeeded (failed).
--
-- KEYS: [1] the job's hash
-- ARGV: [1] job_id, [2] from status, [3] to status, [4] now, then field, value pairs ('' deletes
--       the field)
-- Returns: {DONE}, or {REFUSED} (the job is no longer in `from`); an error for a change the
--          job's state machine does not allow
--- @include "job_status"

if redis.call('HGET', KEYS[1], 'status') ~= ARGV[2] then return {REFUSED} end
if ARGV[2] ~= ARGV[3] and not job_may(ARGV[2], ARGV[3]) then
  return redis.error_reply('no job transition from ' .. ARGV[2] .. ' to ' .. ARGV[3])
end
for i = 5, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i]) else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
set_status(ARGV[1], ARGV[3], tonumber(ARGV[4]))
return {DONE}
