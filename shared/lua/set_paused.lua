-- Pause or resume a project: runs in flight finish, no new one starts until it is resumed.
--
-- KEYS: [1] the project's pause switch
-- ARGV: [1] project, [2] 1 to pause, 0 to resume
-- Returns: {DONE}
--- @include "fair_share"

local project = ARGV[1]
if ARGV[2] == '1' then
  redis.call('SET', KEYS[1], '1')
  local pass = redis.call('ZSCORE', READY, project)
  if pass then set_aside(project, tonumber(pass)) end
else
  redis.call('DEL', KEYS[1])
  wake(project)
end
return {DONE}
