"""How close Redis is to its memory limit, and the refusal of new work before it gets there.

Redis runs with `maxmemory` and `noeviction`: past the limit it refuses every write, which would
stop runs from being recorded as they finish. New jobs are refused well before that (503 with a
reason), so the work already accepted always has room to finish and be archived.
"""

import time
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.errors import Unavailable


@dataclass(frozen=True, slots=True)
class MemoryReading:
    used: int
    limit: int  # 0: no maxmemory set

    @property
    def fraction(self) -> float | None:
        return self.used / self.limit if self.limit else None


async def read_memory(redis: Redis) -> MemoryReading:
    info = await redis.info("memory")
    return MemoryReading(int(info["used_memory"]), int(info.get("maxmemory", 0)))


class MemoryGuard:
    """Refuses new work while Redis uses more than `refuse_fraction` of its maxmemory. The reading
    is at most `max_age` seconds old: one INFO a second, not one per request."""

    def __init__(self, redis: Redis, refuse_fraction: float, max_age: float = 1.0) -> None:
        self.redis = redis
        self.refuse_fraction = refuse_fraction
        self.max_age = max_age
        self._reading: MemoryReading | None = None
        self._read_at = 0.0

    async def reading(self) -> MemoryReading:
        now = time.monotonic()
        if self._reading is None or now - self._read_at > self.max_age:
            self._reading, self._read_at = await read_memory(self.redis), now
        return self._reading

    async def check(self) -> None:
        fraction = (await self.reading()).fraction
        if fraction is not None and fraction >= self.refuse_fraction:
            raise Unavailable(
                f"Bunch's Redis is at {fraction:.0%} of its memory limit, so new work is refused until "
                "finished jobs are archived or an operator raises the limit. Nothing was changed; try again later."
            )
