-- Keep the answer of a claimed Idempotency-Key's request, for its repeats, until it expires.
--
-- KEYS: [1] the key's hash (keys.idempotent_request)
-- ARGV: [1] the claim's token, [2] how long the answer is kept, in ms, [3] HTTP status,
--       [4] headers JSON, [5] body
-- Returns: {DONE}, or {REFUSED} when the claim is no longer this request's (it outlived its
--          lock and the key was claimed again): the answer is not kept

local record = KEYS[1]
if redis.call('HGET', record, 'token') ~= ARGV[1] then return {REFUSED} end
redis.call('HSET', record, 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5])
redis.call('HDEL', record, 'token')
redis.call('PEXPIRE', record, tonumber(ARGV[2]))
return {DONE}
