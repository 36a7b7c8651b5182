"""The project's queue as a whole: pause and resume, bulk cancel and retry, stats and metrics."""

import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.gateway.deps import ProjectDep, RedisDep, SettingsDep, StoreDep
from services.gateway.jobs import accept
from services.gateway.schemas import API_PROBLEMS, JsonRequest, problems
from shared import keys
from shared.ids import ID_PATTERN, Id
from shared.models import JobStatus

router = APIRouter(prefix="/api/queue", tags=["queue"], responses=API_PROBLEMS)

TIME_RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


class PauseState(BaseModel):
    paused: bool


class CancelMany(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    job_ids: list[Id] | None = Field(None, max_length=10_000)


class CancelCount(BaseModel):
    canceled_count: int


class RetryMany(JsonRequest):
    # The schema says what the validator checks, so clients (and schemathesis) can see it: one of the two.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["job_id"],
                    "properties": {"job_id": {"type": "string", "pattern": ID_PATTERN}, "retry_all": {"const": False}},
                },
                {"required": ["retry_all"], "properties": {"retry_all": {"const": True}, "job_id": {"type": "null"}}},
            ]
        },
    )

    job_id: Id | None = None
    retry_all: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "RetryMany":
        if bool(self.job_id) == self.retry_all:
            raise ValueError('give either "job_id" or "retry_all": true')
        return self


class Retried(BaseModel):
    id: str
    retry_of: str


class RetriedList(BaseModel):
    retried: list[Retried]


class QueueCounts(BaseModel):
    queued: int
    processing: int
    packaging: int
    completed: int
    failed: int
    canceled: int
    total_jobs: int


class DispatcherState(BaseModel):
    running: int
    active_runs: int
    max_concurrency: int
    project_max_concurrency: int
    dispatch_rpm: int
    paused: bool


class QueueStats(BaseModel):
    queue: QueueCounts
    dispatcher: DispatcherState


class HourlyPoint(BaseModel):
    hour: datetime
    images_succeeded: int
    images_failed: int
    tokens: int


class QueueMetrics(BaseModel):
    time_range: str
    success_rate: float | None
    avg_duration_s: float | None
    min_duration_s: float | None
    max_duration_s: float | None
    jobs_finished: int
    images_succeeded: int
    images_failed: int
    total_tokens: int
    estimated_cost_usd: float
    hourly_breakdown: list[HourlyPoint]


@router.post("/pause", response_model=PauseState)
async def pause(project: ProjectDep, store: StoreDep) -> PauseState:
    """Running runs finish; no new run of this project starts until resumed."""
    await store.set_paused(project, True)
    return PauseState(paused=True)


@router.post("/resume", response_model=PauseState)
async def resume(project: ProjectDep, store: StoreDep) -> PauseState:
    await store.set_paused(project, False)
    return PauseState(paused=False)


@router.post("/cancel", response_model=CancelCount)
async def cancel_many(body: CancelMany, project: ProjectDep, store: StoreDep, redis: RedisDep) -> CancelCount:
    """The named jobs, or every queued and processing job of the project."""
    # The project's live jobs come from their own index: the cost follows the work to cancel, never
    # the project's history.
    job_ids = body.job_ids if body.job_ids is not None else await redis.zrange(keys.project_live_jobs(project), 0, -1)
    count = 0
    for job in await store.get_many(job_ids):
        if job.project == project and job.status in (JobStatus.QUEUED, JobStatus.PROCESSING):
            done, _ = await store.cancel(job.id)
            count += done
    return CancelCount(canceled_count=count)


@router.post("/retry", status_code=status.HTTP_202_ACCEPTED, response_model=RetriedList, responses=problems(404, 409))
async def retry_many(
    body: RetryMany, project: ProjectDep, store: StoreDep, settings: SettingsDep, redis: RedisDep
) -> RetriedList:
    """One failed job, or every failed job of the project not retried yet."""
    if body.job_id:
        job = await store.get_for_project(project, body.job_id)
        if job is None:
            raise HTTPException(404, "No such job in this project.")
        if job.status != JobStatus.FAILED:
            raise HTTPException(409, f"Only failed jobs are retried here; this one is {job.status.value}.")
        candidates = [job]
    else:
        candidates = [
            job
            for job in await store.get_many(await redis.zrange(keys.project_failed_jobs(project), 0, -1))
            if job.status == JobStatus.FAILED and not job.retried_by
        ]
    retried = []
    for job in candidates:
        accepted = await accept(await store.config(job.id), project, store, settings, redis, retry_of=job.id)
        retried.append(Retried(id=accepted.id, retry_of=job.id))
    return RetriedList(retried=retried)


@router.get("/stats", response_model=QueueStats)
async def stats(project: ProjectDep, settings: SettingsDep, redis: RedisDep) -> QueueStats:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.project_counts(project))
        pipe.zcard(keys.RUNNING)
        pipe.zcard(keys.project_running(project))
        pipe.exists(keys.project_paused(project))
        counts, running, active, paused = await pipe.execute()
    by_status = {s.value: max(0, int(counts.get(s.value, 0))) for s in JobStatus}
    return QueueStats(
        queue=QueueCounts(**by_status, total_jobs=sum(by_status.values())),
        dispatcher=DispatcherState(
            running=running,
            active_runs=active,
            max_concurrency=settings.max_concurrency,
            project_max_concurrency=settings.project_max_concurrency,
            dispatch_rpm=settings.dispatch_rpm,
            paused=bool(paused),
        ),
    )


@router.get("/metrics", response_model=QueueMetrics)
async def metrics(
    project: ProjectDep,
    settings: SettingsDep,
    redis: RedisDep,
    time_range: Annotated[Literal["24h", "7d", "30d", "all"], Query()] = "24h",
) -> QueueMetrics:
    window = TIME_RANGES[time_range]
    since = 0.0 if window is None else time.time() - window
    first_hour = int(since // 3600)
    # A few figures an hour, kept by the scripts as images and jobs finish: the cost of this read
    # grows with the hours in the range, never with the jobs in it.
    hours: dict[int, dict[str, float]] = {}
    for field, value in (await redis.hgetall(keys.project_hourly(project))).items():
        hour, _, kind = field.partition(":")
        if int(hour) >= first_hour:
            hours.setdefault(int(hour), {})[kind] = float(value)

    def total(kind: str) -> int:
        return int(sum(h.get(kind, 0) for h in hours.values()))

    succeeded, failed, jobs = total("succeeded"), total("failed"), total("jobs")
    lows = [h["min_seconds"] for h in hours.values() if "min_seconds" in h]
    highs = [h["max_seconds"] for h in hours.values() if "max_seconds" in h]
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
        estimated_cost_usd=round(succeeded * settings.cost_per_image_usd.get(settings.gemini_model, 0.0), 4),
        hourly_breakdown=[
            HourlyPoint(
                hour=datetime.fromtimestamp(hour * 3600, UTC),
                images_succeeded=int(h.get("succeeded", 0)),
                images_failed=int(h.get("failed", 0)),
                tokens=int(h.get("tokens", 0)),
            )
            for hour, h in sorted(hours.items())
        ],
    )
