-- Retention claims an upload for deletion if nothing used it since the cutoff: its records go (so
-- no new job can name it), and the id is noted as being deleted until its object is. Called again
-- for an id already noted (a purge that died), it renews the claim.
--
-- KEYS: [1] the upload's holders (its records in every project that sent it), [2] the
--       uploads-in-use index, [3] the uploads-being-deleted index
-- ARGV: [1] upload_id, [2] cutoff, [3] now
-- Returns: {DONE} (claimed), or {REFUSED} (used since the cutoff)

local upload_id, cutoff, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local used = redis.call('ZSCORE', KEYS[2], upload_id)
if used and tonumber(used) > cutoff then return {REFUSED} end
for _, record in ipairs(redis.call('SMEMBERS', KEYS[1])) do redis.call('DEL', record) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], upload_id)
redis.call('ZADD', KEYS[3], now, upload_id)
return {DONE}
