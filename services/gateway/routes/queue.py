"""/api/queue: the project's queue as a whole: pause and resume, bulk cancel and retry, stats and metrics."""

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.quotes import budget_state, check_budget, standing_of
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.queue import (
    BatchLaneState,
    CancelCount,
    CancelMany,
    DispatcherState,
    HourlyPoint,
    PauseState,
    QueueCounts,
    QueueMetrics,
    QueueStats,
    Retried,
    RetriedList,
    RetryMany,
    RunPodWorkers,
    UpstreamHoldState,
)
from services.gateway.submissions import submit
from shared.errors import Conflict, NotFound
from shared.models import JobStatus
from shared.pricing import usd
from shared.stores.upstream import Hold
from shared.times import utc

router = APIRouter(prefix="/api/queue", tags=["queue"], responses=API_PROBLEMS)

TIME_RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


@router.post("/pause", response_model=PauseState)
async def pause(project: ProjectDep, services: ServicesDep) -> PauseState:
    """Running runs finish; no new run of this project starts until resumed."""
    await services.store.set_paused(project, True)
    return PauseState(paused=True)


@router.post("/resume", response_model=PauseState)
async def resume(project: ProjectDep, services: ServicesDep) -> PauseState:
    await services.store.set_paused(project, False)
    return PauseState(paused=False)


@router.post("/cancel", response_model=CancelCount)
async def cancel_many(body: CancelMany, project: ProjectDep, services: ServicesDep) -> CancelCount:
    """The named jobs, or every queued and processing job of the project."""
    job_ids = body.job_ids if body.job_ids is not None else await services.projects.live_job_ids(project)
    count = 0
    for job in await services.store.get_many(job_ids):
        if job.project == project and job.status in (JobStatus.QUEUED, JobStatus.PROCESSING):
            done, _ = await services.store.cancel(job.id)
            count += done
    return CancelCount(canceled_count=count)


@router.post(
    "/retry", status_code=status.HTTP_202_ACCEPTED, response_model=RetriedList, responses=problems(402, 404, 409)
)
async def retry_many(body: RetryMany, project: ProjectDep, services: ServicesDep) -> RetriedList:
    """One failed job, or every failed job of the project not retried yet."""
    store = services.store
    if body.job_id:
        job = await store.get_for_project(project, body.job_id)
        if job is None:
            raise NotFound("No such job in this project.")
        if job.status != JobStatus.FAILED:
            raise Conflict(f"Only failed jobs are retried here; this one is {job.status.value}.")
        candidates = [job]
    else:
        candidates = [
            job
            for job in await store.get_many(await services.projects.failed_job_ids(project))
            if job.status == JobStatus.FAILED and not job.retried_by
        ]
    configs = [await store.config(job.id) for job in candidates]
    # All of them against the budget at once (402, none retried), as each alone may fit.
    await check_budget(services, project, configs)
    retried = []
    for job, config in zip(candidates, configs, strict=True):
        accepted = await submit(services, project, config, retry_of=job.id, budget_checked=True)
        retried.append(Retried(id=accepted.id, retry_of=job.id))
    return RetriedList(retried=retried)


@router.get("/stats", response_model=QueueStats)
async def stats(project: ProjectDep, services: ServicesDep) -> QueueStats:
    state, settings = await services.projects.state(project), services.settings
    standing = await standing_of(services, project)
    return QueueStats(
        queue=QueueCounts(**state.jobs_by_status, total_jobs=sum(state.jobs_by_status.values())),
        dispatcher=DispatcherState(
            running=state.running_everywhere,
            active_runs=state.running,
            max_concurrency=settings.max_concurrency,
            project_max_concurrency=settings.project_max_concurrency,
            dispatch_rpm=settings.dispatch_rpm,
            paused=state.paused,
            pause_reason=state.pause_reason,
            paused_until=utc(state.budget_paused_until),
        ),
        upstream_hold=_hold(state.hold),
        runpod=_runpod_workers(state.runpod_health),
        batch=BatchLaneState(
            batches_in_flight=state.batches_in_flight,
            images_in_flight=state.batch_images,
            max_images_in_flight=settings.project_max_batch_images,
            jobs_waiting=state.batch_jobs_waiting,
        ),
        budget=None if standing is None else budget_state(standing),
    )


def _hold(hold: Hold | None) -> UpstreamHoldState | None:
    if hold is None:
        return None
    return UpstreamHoldState(reason=hold.reason, detail=hold.detail, since=utc(hold.since), until=utc(hold.until))


def _runpod_workers(health: dict[str, Any] | None) -> RunPodWorkers | None:
    """RunPod's /health body ({"jobs": {...}, "workers": {...}}) as the stats show it."""
    if health is None:
        return None
    workers, jobs = health.get("workers") or {}, health.get("jobs") or {}

    def count(group: dict[str, Any], name: str) -> int:
        value = group.get(name)
        return value if isinstance(value, int) and value >= 0 else 0

    return RunPodWorkers(
        fetched_at=utc(float(health.get("fetched_at") or 0)),
        workers_idle=count(workers, "idle"),
        workers_running=count(workers, "running"),
        workers_throttled=count(workers, "throttled"),
        workers_unhealthy=count(workers, "unhealthy"),
        jobs_in_queue=count(jobs, "inQueue"),
        jobs_in_progress=count(jobs, "inProgress"),
    )


@router.get("/metrics", response_model=QueueMetrics)
async def metrics(
    project: ProjectDep,
    services: ServicesDep,
    time_range: Annotated[Literal["24h", "7d", "30d", "all"], Query()] = "24h",
) -> QueueMetrics:
    window = TIME_RANGES[time_range]
    since = 0.0 if window is None else time.time() - window
    hours = await services.projects.hourly(project, first_hour=int(since // 3600))

    def total(kind: str) -> int:
        return int(sum(h.get(kind, 0) for h in hours.values()))

    succeeded, failed, jobs = total("succeeded"), total("failed"), total("jobs")
    lows = [h["min_seconds"] for h in hours.values() if "min_seconds" in h]
    highs = [h["max_seconds"] for h in hours.values() if "max_seconds" in h]
    gemini, runpod = total("gemini_micros"), total("runpod_micros")
    return QueueMetrics(
        time_range=time_range,
        success_rate=round(succeeded / (succeeded + failed), 4) if succeeded + failed else None,
        avg_duration_s=round(sum(h.get("seconds", 0) for h in hours.values()) / jobs, 3) if jobs else None,
        min_duration_s=round(min(lows), 3) if lows else None,
        max_duration_s=round(max(highs), 3) if highs else None,
        jobs_finished=jobs,
        images_succeeded=succeeded,
        images_failed=failed,
        total_tokens=total("tokens"),
        cost_usd=usd(gemini + runpod),
        gemini_cost_usd=usd(gemini),
        runpod_cost_usd=usd(runpod),
        estimated_cost_usd=usd(gemini + runpod),
        hourly_breakdown=[
            HourlyPoint(
                hour=utc(hour * 3600),
                images_succeeded=int(h.get("succeeded", 0)),
                images_failed=int(h.get("failed", 0)),
                tokens=int(h.get("tokens", 0)),
                cost_usd=usd(h.get("gemini_micros", 0) + h.get("runpod_micros", 0)),
            )
            for hour, h in sorted(hours.items())
        ],
    )
