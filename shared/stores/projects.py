"""A project's figures and indexes as a whole: its jobs by status and time, what it has running,
whether it is paused, and its hourly totals (kept by the scripts as jobs and images finish)."""

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared import keys
from shared.models import JobStatus
from shared.stores.upstream import Hold, parse_health, parse_hold


@dataclass(frozen=True, slots=True)
class ProjectState:
    jobs_by_status: dict[str, int]
    running_everywhere: int  # runs in flight, every project
    running: int  # the project's runs in flight
    paused: bool
    hold: Hold | None  # the whole queue's (shared/stores/upstream.py)
    runpod_health: dict[str, Any] | None


class ProjectStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def state(self, project: str) -> ProjectState:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.project_counts(project))
            pipe.zcard(keys.RUNNING)
            pipe.zcard(keys.project_running(project))
            pipe.exists(keys.project_paused(project))
            pipe.hgetall(keys.UPSTREAM_HOLD)
            pipe.get(keys.RUNPOD_HEALTH)
            counts, everywhere, running, paused, hold, health = await pipe.execute()
        by_status = {s.value: max(0, int(counts.get(s.value, 0))) for s in JobStatus}
        return ProjectState(
            by_status, int(everywhere), int(running), bool(paused), parse_hold(hold, time.time()), parse_health(health)
        )

    async def hourly(self, project: str, first_hour: int) -> dict[int, dict[str, float]]:
        """By hour (unix seconds // 3600) from `first_hour` on: each figure the scripts keep. The
        cost grows with the hours in the range, never with the jobs in it."""
        hours: dict[int, dict[str, float]] = {}
        for field, value in (await self.redis.hgetall(keys.project_hourly(project))).items():
            hour, _, kind = field.partition(":")
            if int(hour) >= first_hour:
                hours.setdefault(int(hour), {})[kind] = float(value)
        return hours

    async def live_job_ids(self, project: str) -> list[str]:
        """Queued and processing jobs, from their own index: the cost follows the live work, never
        the project's history."""
        return list(await self.redis.zrange(keys.project_live_jobs(project), 0, -1))

    async def failed_job_ids(self, project: str) -> list[str]:
        """Failed jobs not retried yet, from their own index."""
        return list(await self.redis.zrange(keys.project_failed_jobs(project), 0, -1))

    async def jobs_before(self, project: str, upper: str, count: int) -> list[tuple[str, float]]:
        """(job id, creation time) of up to `count` jobs, newest first, created before `upper` (a
        ZRANGE bound: "+inf", or "(<time>")."""
        found = await self.redis.zrevrangebyscore(
            keys.project_jobs(project), upper, "-inf", start=0, num=count, withscores=True
        )
        return [(str(job_id), float(score)) for job_id, score in found]
