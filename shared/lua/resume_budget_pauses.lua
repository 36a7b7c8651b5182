-- Resume the projects paused for budget whose period has ended: a new day or month starts their
-- spend from zero. O(projects due): BUDGET_PAUSES is scored by when each pause ends. An operator's
-- pause or resume took its project out of BUDGET_PAUSES, so it is never undone here.
--
-- KEYS: none (BUDGET_PAUSES and the projects' switches are found as it goes)
-- ARGV: [1] now (unix seconds), [2] most projects to resume in this call
-- Returns: {DONE, {projects resumed}}
--- @include "fair_share"
--- @include "budgets"

local due = redis.call('ZRANGEBYSCORE', BUDGET_PAUSES, '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, project in ipairs(due) do
  redis.call('ZREM', BUDGET_PAUSES, project)
  resume_project(project)
end
return {DONE, due}
