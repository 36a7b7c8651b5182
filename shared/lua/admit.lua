-- Put an accepted job in its project's queue, and wake its project for the scheduler. A
-- redelivered message changes nothing.
--
-- KEYS: [1] the job's hash
-- ARGV: [1] job_id, [2] priority_scale (score = priority * scale + sequence)
-- Returns: DONE, or REFUSED (not queued, or every run already started)
--- @include "fair_share"

local j = redis.call('HMGET', KEYS[1], 'status', 'project', 'priority', 'seq', 'runs_total', 'runs_started')
if j[1] ~= 'queued' or tonumber(j[6] or '0') >= tonumber(j[5] or '0') then return REFUSED end
enqueue(j[2], ARGV[1], tonumber(j[3]) * tonumber(ARGV[2]) + tonumber(j[4]))
activate(j[2])
return DONE
