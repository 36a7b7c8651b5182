-- The last step of archiving a final job: once the caller has written its records to its archive
-- object, they leave Redis: its config field and its images hash (UNLINK: freed off the main
-- thread, whatever its size). Its summary hash stays, marked archived; its run records are
-- unlinked by the caller in batches (they expire anyway). A job changed since the caller read what
-- it archived (a redo adds runs) is left as it is.
--
-- KEYS: [1] the job's hash, [2] its images hash
-- ARGV: [1] the runs_total the archive was read at
-- Returns: {DONE}, or {REFUSED} (not final, archived already, or changed since)

local j = redis.call('HMGET', KEYS[1], 'status', 'archived', 'runs_total')
if not FINAL[j[1]] or j[2] or j[3] ~= ARGV[1] then return {REFUSED} end
redis.call('HDEL', KEYS[1], 'config')
redis.call('UNLINK', KEYS[2])
-- Written anew: a hash that once held a long value (the config) keeps a table encoding, three
-- times the size of the compact one a new hash of short values gets.
local summary = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'archived', 1, unpack(summary))
return {DONE}
