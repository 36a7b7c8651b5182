"""Resumes the projects paused because their spend reached their budget, once their period (UTC day
or month) has ended. Each pass reads only the pauses that are due (keys.BUDGET_PAUSES is scored by
when each ends) and resumes them in one script call, so it costs O(due), whatever the number of
projects; any dispatcher replica may do it, the script makes it happen once."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from shared.redis_connection import REDIS_DOWN
from shared.stores.budgets import BudgetStore

log = logging.getLogger(__name__)

# A pause for budget ends at most this late after its period does.
PASS_INTERVAL_SECONDS = 5.0
# Projects resumed per script call; more due ones are resumed by the next calls of the same pass.
RESUME_BATCH = 100


class BudgetResumer:
    def __init__(
        self,
        budgets: BudgetStore,
        interval_seconds: float = PASS_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.budgets = budgets
        self.interval = interval_seconds
        self.clock = clock

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.pass_once(self.clock())
            except REDIS_DOWN as exc:  # a restart or a failover: the next pass finds them again
                log.warning("budget resume pass: redis unavailable (%s); retrying", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def pass_once(self, now: float) -> list[str]:
        """Resume every project whose pause for budget ended by `now`; returns them."""
        resumed: list[str] = []
        while True:
            batch = await self.budgets.resume_due(now, RESUME_BATCH)
            resumed += batch
            if len(batch) < RESUME_BATCH:
                break
        for project in resumed:
            log.info("project %s resumed: its budget period ended", project)
        return resumed
