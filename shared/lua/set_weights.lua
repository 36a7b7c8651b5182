-- The operator's fair-share weights replace the old ones; the backlog's total weight is summed
-- anew. Run once as a dispatcher starts: O(projects with work).
--
-- KEYS: [1] the weights hash, [2] the backlog hash, [3] the backlog's total weight
-- ARGV: project, weight pairs (every other project weighs 1)
-- Returns: {DONE, the number of projects in the backlog}
--- @include "fair_share"

redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local backlog = redis.call('HKEYS', KEYS[2])
local total = 0
for _, project in ipairs(backlog) do
  local w = weight(project)
  redis.call('HSET', KEYS[2], project, w)
  total = total + w
end
redis.call('SET', KEYS[3], total)
return {DONE, #backlog}
