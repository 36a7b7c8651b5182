-- The last step of bringing an archived job's records back before a redo (its images hash was
-- written first, in slices): its config, and the job is no longer archived.
--
-- KEYS: [1] the job's hash
-- ARGV: [1] the job's config (JSON, as it was stored)
-- Returns: {DONE}, or {REFUSED} (not archived: restored already)

if not redis.call('HGET', KEYS[1], 'archived') then return {REFUSED} end
redis.call('HSET', KEYS[1], 'config', ARGV[1])
redis.call('HDEL', KEYS[1], 'archived')
return {DONE}
