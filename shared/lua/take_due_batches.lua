-- Take the batch lane's batches due for a look (to submit, or to ask Gemini how they are), each
-- leased to the caller until `lease_until`: another dispatcher takes one over only once the lease
-- has run out (its holder died), so no two work on one batch at once.
--
-- KEYS: none
-- ARGV: [1] now, [2] lease_until, [3] limit
-- Returns: {DONE, {run_id, ...}}
local due = redis.call('ZRANGEBYSCORE', BATCH_IN_FLIGHT, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, run_id in ipairs(due) do redis.call('ZADD', BATCH_IN_FLIGHT, 'XX', ARGV[2], run_id) end
return {DONE, due}
