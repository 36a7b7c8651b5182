-- Note a step of a batch-lane run on its record, only while that claim is the run's live one: that a
-- submission under the claim's name has begun (so a crash before its answer is followed by a look
-- for the batch on Gemini, never a second submission), or the name Gemini gave the batch. Then set
-- when a dispatcher looks at it next.
--
-- KEYS: [1] the run's hash
-- ARGV: [1] run_id, [2] attempt, [3] claim, [4] field (batch_submitting or batch_name), [5] value,
--       [6] when to look at it next
-- Returns: {DONE}, or {REFUSED, the run's status} (canceled, settled or claimed again meanwhile)
local r = redis.call('HMGET', KEYS[1], 'attempt', 'claim', 'status')
if r[1] ~= ARGV[2] or r[2] ~= ARGV[3] or r[3] ~= 'dispatched' then return {REFUSED, r[3] or ''} end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5])
redis.call('ZADD', BATCH_IN_FLIGHT, 'XX', ARGV[6], ARGV[1])
return {DONE}
