-- Change a job's priority while it still has runs waiting to start: it moves in its project's
-- queue (priority orders a project's own jobs; between projects, fair share decides).
--
-- KEYS: [1] the job's hash
-- ARGV: [1] job_id, [2] priority, [3] priority_scale
-- Returns: {DONE}, or {REFUSED} (finished, or every run already started)
--- @include "job_status"

local j = redis.call('HMGET', KEYS[1], 'status', 'project', 'seq', 'runs_total', 'runs_started')
if not LIVE[j[1]] or tonumber(j[5] or '0') >= tonumber(j[4] or '0') then return {REFUSED} end
redis.call('HSET', KEYS[1], 'priority', ARGV[2])
local score = tonumber(ARGV[2]) * tonumber(ARGV[3]) + tonumber(j[3])
redis.call('ZADD', project_queue(j[2]), 'XX', score, ARGV[1])
emit(ARGV[1], 'status')
return {DONE}
