-- Claim an Idempotency-Key for a request, or find what became of the key's first request. The
-- one decision between concurrent repeats: exactly one of them gets DONE and runs.
--
-- KEYS: [1] the key's hash (keys.idempotent_request)
-- ARGV: [1] the request's fingerprint, [2] a token naming this claim, [3] how long the claim holds
--       unanswered, in ms (a gateway killed mid-request frees it this way)
-- Returns: {DONE} (claimed: run the request), {REPLAY, status, headers JSON, body} (answered
--          before), {BUSY} (its first request still runs), {REFUSED} (the key was used for a
--          different request)

local record = KEYS[1]
local fingerprint, token, lock_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local held = redis.call('HMGET', record, 'fingerprint', 'status', 'headers', 'body')
if not held[1] then
  redis.call('HSET', record, 'fingerprint', fingerprint, 'token', token)
  redis.call('PEXPIRE', record, lock_ms)
  return {DONE}
end
if held[1] ~= fingerprint then return {REFUSED} end
if held[2] then return {REPLAY, held[2], held[3], held[4]} end
return {BUSY}
