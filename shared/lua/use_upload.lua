-- An upload is being sent (again): note the use, so retention keeps it, unless retention is
-- deleting its object right now. Then the caller waits and asks again, or its PUT could land
-- before that DELETE and be lost. A deletion claimed longer ago than the lease was abandoned (its
-- purge died): the caller takes the id back and must PUT, since the object may be gone.
--
-- KEYS: [1] the uploads-in-use index, [2] the uploads-being-deleted index
-- ARGV: [1] upload_id, [2] now, [3] the deletion claim's lease in seconds
-- Returns: {DONE} (go on), {RECLAIMED} (go on and PUT the object), or {REFUSED} (wait and ask again)

local claimed = redis.call('ZSCORE', KEYS[2], ARGV[1])
local answer = DONE
if claimed then
  if tonumber(claimed) + tonumber(ARGV[3]) > tonumber(ARGV[2]) then return {REFUSED} end
  redis.call('ZREM', KEYS[2], ARGV[1])
  answer = RECLAIMED
end
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
return {answer}
