"""A project's figures and indexes as a whole: its jobs by status and time, what it has running,
whether it is paused, and its hourly totals (kept by the scripts as jobs and images finish)."""

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared import keys
from shared.models import JobStatus
from shared.stores.records import PRIORITY_SCALE
from shared.stores.upstream import Hold, parse_health, parse_hold


@dataclass(frozen=True, slots=True)
class ProjectState:
    jobs_by_status: dict[str, int]
    running_everywhere: int  # runs in flight, every project
    running: int  # the project's runs in flight
    paused: bool
    hold: Hold | None  # the whole queue's (shared/stores/upstream.py)
    runpod_health: dict[str, Any] | None
    # Set when the pause is for budget (shared/lua/include/budgets.lua): when it ends by itself.
    budget_paused_until: float | None = None
    batches_in_flight: int = 0  # the project's Gemini batches submitted or being submitted
    batch_images: int = 0  # their images (BUNCH_PROJECT_MAX_BATCH_IMAGES bounds them)
    batch_jobs_waiting: int = 0  # its batch-lane jobs with batches left to submit

    @property
    def pause_reason(self) -> str | None:
        """ "budget" (it reached its budget) or "operator"; None when not paused."""
        if not self.paused:
            return None
        return "budget" if self.budget_paused_until is not None else "operator"


@dataclass(frozen=True, slots=True)
class QuoteFigures:
    """What a quote estimates a new job's wait and RunPod time from, read at one moment."""

    running: int  # the project's runs in flight and due retries
    jobs_ahead: int  # its queued jobs a new one of the given priority would wait behind
    jobs_queued: int
    runs_waiting: int  # runs left to start of its queued jobs
    weight: float
    backlog_weight: float  # of every project with runs to start, this one included
    run_seconds: float | None  # observed average run time, from dispatch to outcome (ETAs)
    execution_seconds: float | None  # observed average RunPod execution time of a run (billed)
    batch_seconds: float | None  # observed average turnaround of a Gemini batch
    paused: bool
    held: bool  # the whole queue is held (shared/stores/upstream.py)

    @property
    def runs_ahead(self) -> int:
        """Runs before a new job's first: those in flight, and its jobs ahead at the average runs
        left per queued job (as shared/lua/queue_figures.lua counts them)."""
        if not self.jobs_queued:
            return self.running
        return self.running + round(self.jobs_ahead * self.runs_waiting / self.jobs_queued)

    @property
    def share(self) -> float:
        """The project's share of the capacity: its weight over that of every project with work."""
        return self.weight / max(self.weight, self.backlog_weight)


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
            pipe.zscore(keys.BUDGET_PAUSES, project)
            pipe.zcard(keys.project_batch_in_flight(project))
            pipe.get(keys.project_batch_images(project))
            pipe.zcard(keys.project_batch_queue(project))
            counts, everywhere, running, paused, hold, health, budget_until, *batch = await pipe.execute()
        by_status = {s.value: max(0, int(counts.get(s.value, 0))) for s in JobStatus}
        return ProjectState(
            by_status,
            int(everywhere),
            int(running),
            bool(paused),
            parse_hold(hold, time.time()),
            parse_health(health),
            float(budget_until) if paused and budget_until is not None else None,
            int(batch[0]),
            max(0, int(batch[1] or 0)),
            int(batch[2]),
        )

    async def quote_figures(self, project: str, priority: int) -> QuoteFigures:
        """The figures a quote for a new job of `priority` in this project reads, in one round trip."""
        queue = keys.project_queue(project)
        # Jobs of a lower or equal priority number go first (score = priority x scale + sequence).
        below = f"({(priority + 1) * PRIORITY_SCALE}"
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.project_running(project))
            pipe.zcard(keys.project_retries(project))
            pipe.zcount(queue, "-inf", below)
            pipe.zcard(queue)
            pipe.get(keys.project_runs_waiting(project))
            pipe.hget(keys.WEIGHTS, project)
            pipe.get(keys.BACKLOG_WEIGHT)
            pipe.hexists(keys.BACKLOG, project)
            pipe.hmget(keys.RUN_SECONDS, "avg", "execution_avg")
            pipe.hget(keys.BATCH_SECONDS, "avg")
            pipe.exists(keys.project_paused(project))
            pipe.hgetall(keys.UPSTREAM_HOLD)
            (
                running,
                retries,
                ahead,
                queued,
                waiting,
                weight,
                backlog,
                in_backlog,
                (avg, execution),
                batch,
                paused,
                hold,
            ) = await pipe.execute()
        own = float(weight or 1)
        # A project not in the backlog yet joins it with this job.
        backlog_weight = float(backlog or 0) + (0 if in_backlog else own)
        return QuoteFigures(
            running=int(running) + int(retries),
            jobs_ahead=int(ahead),
            jobs_queued=int(queued),
            runs_waiting=max(0, int(waiting or 0)),
            weight=own,
            backlog_weight=backlog_weight,
            run_seconds=_seconds(avg),
            execution_seconds=_seconds(execution),
            batch_seconds=_seconds(batch),
            paused=bool(paused),
            held=parse_hold(hold, time.time()) is not None,
        )

    async def hourly(self, project: str, first_hour: int) -> "HourlyFigures":
        """By hour (unix seconds // 3600) from `first_hour` on: each figure the scripts keep. The
        cost grows with the hours in the range, never with the jobs in it."""
        hours: dict[int, dict[str, float]] = {}
        for field, value in (await self.redis.hgetall(keys.project_hourly(project))).items():
            hour, _, kind = field.partition(":")
            if int(hour) >= first_hour:
                hours.setdefault(int(hour), {})[kind] = float(value)
        return HourlyFigures(hours)

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


def _seconds(value: str | None) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class HourlyFigures:
    """A project's hourly figures over a range of hours (complete_run.lua and the job scripts keep
    them): images succeeded and failed, jobs finished and their seconds, tokens, cost in micro-USD."""

    by_hour: dict[int, dict[str, float]]

    def total(self, kind: str) -> int:
        return int(sum(figures.get(kind, 0) for figures in self.by_hour.values()))

    @property
    def success_rate(self) -> float | None:
        succeeded, failed = self.total("succeeded"), self.total("failed")
        return round(succeeded / (succeeded + failed), 4) if succeeded + failed else None

    @property
    def average_seconds(self) -> float | None:
        """Of the jobs that finished in the range."""
        jobs = self.total("jobs")
        return sum(figures.get("seconds", 0) for figures in self.by_hour.values()) / jobs if jobs else None

    @property
    def shortest_seconds(self) -> float | None:
        found = [figures["min_seconds"] for figures in self.by_hour.values() if "min_seconds" in figures]
        return min(found) if found else None

    @property
    def longest_seconds(self) -> float | None:
        found = [figures["max_seconds"] for figures in self.by_hour.values() if "max_seconds" in figures]
        return max(found) if found else None
