-- Forget the consumers of a group that hold nothing and have not read for a while: replicas that
-- died or were scaled away, whose names would otherwise pile up in XINFO with every restart. The
-- pending check and the delete are one step, so a consumer that just took a message is never
-- forgotten with it. A live consumer forgotten while idle is recreated by its next read.
--
-- KEYS: [1] the stream
-- ARGV: [1] group, [2] idle milliseconds, [3] the caller's own consumer name (never forgotten)
-- Returns: {DONE, {the names forgotten}}

local forgotten = {}
for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #flat, 2 do consumer[flat[i]] = flat[i + 1] end
  if consumer.pending == 0 and consumer.idle > tonumber(ARGV[2]) and consumer.name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer.name)
    forgotten[#forgotten + 1] = consumer.name
  end
end
return {DONE, forgotten}
