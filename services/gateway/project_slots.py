"""Each project's share of a gateway process's heavy reads.

One event loop serves every project, first come first served: a project that keeps several
heavy requests in flight (pages of a huge job's results) would make every other project's request
wait behind all of them. Here a project holds at most `per_project` heavy requests at once per
process; its others wait their turn, so another project's request waits for at most that many.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ProjectSlots:
    def __init__(self, per_project: int) -> None:
        self.per_project = per_project
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, project: str) -> AsyncIterator[None]:
        semaphore = self._slots.setdefault(project, asyncio.Semaphore(self.per_project))
        self._holders[project] = self._holders.get(project, 0) + 1
        try:
            async with semaphore:
                yield
        finally:
            # Forgotten once nobody holds or waits for it: memory follows active projects only.
            self._holders[project] -= 1
            if not self._holders[project]:
                del self._holders[project], self._slots[project]
