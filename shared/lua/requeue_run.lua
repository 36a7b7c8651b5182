-- Put a run back to be started again after `ready_at`: a failed attempt (as a new attempt), or a
-- /run call that never reached RunPod (the same attempt: nothing of it can arrive later). A batch-lane
-- run waits in the batch lane's retries: it never takes a RunPod slot.
--
-- KEYS: [1] the run's hash
-- ARGV: [1] run_id, [2] attempt, [3] ready_at, [4] 1 for a new attempt, else 0, [5] reason,
--       [6] the claim that failed
-- Returns: {DONE, the attempt it will run as}, or {REFUSED} (that claim is no longer live)
--- @include "fair_share"

local r = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'project', 'claim')
if r[1] ~= ARGV[2] or (r[4] or '') ~= ARGV[6] or not run_may(r[2], 'queued') then return {REFUSED} end
local attempt = tonumber(ARGV[2]) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'attempt', attempt, 'status', 'queued', 'runpod_id', '', 'last_error', ARGV[5])
redis.call('HDEL', KEYS[1], 'status_refusals')
leave_running(ARGV[1], r[3])
redis.call('ZADD', retry_queue(ARGV[1]), ARGV[3], ARGV[1])
return {DONE, attempt}
