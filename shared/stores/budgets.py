"""Budgets in Redis: the operator's limits as the scripts read them, each project's spend per period
(written by complete_run.lua) and the pauses for budget (include/budgets.lua) with their resume."""

from collections.abc import Mapping

from redis.asyncio import Redis

from shared import keys, scripts
from shared.budgets import Budget, Standing, period_end, period_id


class BudgetStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def set_limits(self, budgets: Mapping[str, Budget]) -> None:
        """The operator's budgets, replacing the previous ones (each dispatcher at start, as the
        fair-share weights): complete_run.lua compares each project's spend with its own."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.BUDGETS)
            if budgets:
                pipe.hset(
                    keys.BUDGETS,
                    mapping={project: f"{b.limit_micros} {b.period}" for project, b in budgets.items()},
                )
            await pipe.execute()

    async def standing(self, project: str, budget: Budget, now: float) -> Standing:
        """The project's recorded spend in the budget's period holding `now`."""
        spent = await self.redis.get(keys.project_spend_in(project, period_id(budget.period, now)))
        return Standing(budget.period, budget.limit_micros, int(spent or 0), period_end(budget.period, now))

    async def paused_until(self, project: str) -> float | None:
        """When the project's pause for budget ends; None: it is not paused for budget."""
        score = await self.redis.zscore(keys.BUDGET_PAUSES, project)
        return None if score is None else float(score)

    async def resume_due(self, now: float, limit: int = 100) -> list[str]:
        """Resume up to `limit` projects whose pause for budget ended by `now`; returns them."""
        resumed = await scripts.RESUME_BUDGET_PAUSES(self.redis, [], [now, limit])
        return [str(project) for project in resumed.values[0]]
