-- Free a claimed Idempotency-Key whose request created nothing (an error, a dropped request): the
-- next request with the key runs, whatever its body.
--
-- KEYS: [1] the key's hash (keys.idempotent_request)
-- ARGV: [1] the claim's token
-- Returns: {DONE}, or {REFUSED} when the claim is no longer this request's

local record = KEYS[1]
if redis.call('HGET', record, 'token') ~= ARGV[1] then return {REFUSED} end
redis.call('DEL', record)
return {DONE}
