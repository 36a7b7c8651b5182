-- What runs cost a project, per UTC day and calendar month, and its budget (BUNCH_PROJECT_BUDGETS,
-- kept in BUDGETS by the dispatcher): the pause when its spend reaches the budget, and the resume.
-- Needs fair_share (included before it).

-- Spend counters live a day past their period, so a reading just after the boundary still finds them.
local SPEND_KEPT_SECONDS = 86400

-- Add `cost` micro-dollars to the project's spend of the day and of the month (period ids and
-- their ends, unix seconds, from the caller: shared/budgets.py). When this crosses the project's
-- budget, the project is paused for budget until its period ends, unless an operator's pause is
-- already on (that one stays the operator's). Only the crossing pauses: after an operator resumed
-- a project over its budget, its runs in flight do not pause it again. Returns true if it paused.
local function add_spend(project, cost, day, day_end, month, month_end)
  local spent = {}
  local day_key, month_key = project_spend(project) .. ':' .. day, project_spend(project) .. ':' .. month
  spent.day = redis.call('INCRBY', day_key, cost)
  redis.call('EXPIREAT', day_key, day_end + SPEND_KEPT_SECONDS)
  spent.month = redis.call('INCRBY', month_key, cost)
  redis.call('EXPIREAT', month_key, month_end + SPEND_KEPT_SECONDS)
  local budget = redis.call('HGET', BUDGETS, project)
  if not budget then return false end
  local limit, period = string.match(budget, '^(%d+) (%a+)$')
  limit = tonumber(limit)
  local now_spent = spent[period]
  if not limit or not now_spent or now_spent < limit or now_spent - cost >= limit then return false end
  if redis.call('EXISTS', project_paused(project)) == 1 then return false end
  pause_project(project)
  redis.call('ZADD', BUDGET_PAUSES, period == 'day' and day_end or month_end, project)
  return true
end
