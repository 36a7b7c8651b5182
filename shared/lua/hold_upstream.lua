-- Hold the whole queue: no run starts until `until` (0: until an operator releases it). Runs in
-- flight finish. A hold already in place is kept when it ends later: an operator's hold (0) over
-- any timed one, the later of two timed ones; its reason stays the one that holds longest.
--
-- KEYS: none (HOLD)
-- ARGV: [1] reason, [2] detail, [3] now, [4] until (0: no end)
-- Returns: {DONE} when this hold is now the one in place, {REFUSED} when a longer one was kept
local ends = tonumber(ARGV[4])
local current = redis.call('HGET', HOLD, 'until')
if current then
  local current_ends = tonumber(current) or 0
  if current_ends == 0 or (ends ~= 0 and current_ends >= ends) then return {REFUSED} end
end
local since = redis.call('HGET', HOLD, 'since') or ARGV[3]
redis.call('HSET', HOLD, 'reason', ARGV[1], 'detail', ARGV[2], 'since', since, 'until', ARGV[4])
return {DONE}
