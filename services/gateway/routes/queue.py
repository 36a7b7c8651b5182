"""/api/queue: the project's queue as a whole: pause and resume, bulk cancel and retry, stats and
metrics. Retry, cancel, stats and metrics also answer the queue management API's document style
(services/gateway/document_style.py has the rule, services/gateway/queue_documents.py the mapping)."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, status
from pydantic import Discriminator, Tag

from services.gateway.deps import ProjectDep, Services, ServicesDep
from services.gateway.document_style import EitherStyleRoute, body_style, check_project
from services.gateway.idempotency import idempotent
from services.gateway.queue_documents import (
    cancel_batches,
    cancel_each,
    document_metrics,
    document_stats,
    first_hour_of,
)
from services.gateway.quotes import budget_state, check_budget, standing_of
from services.gateway.schemas.common import EITHER_API_PROBLEMS, either_problems
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
from services.gateway.schemas.queue_documents import (
    CancelDocument,
    CanceledDocument,
    DocumentMetrics,
    DocumentStats,
    RetriedDocument,
    RetryDocument,
)
from services.gateway.submissions import resubmit
from shared.errors import Conflict, NotFound
from shared.models import JobStatus
from shared.pricing import usd
from shared.stores.upstream import Hold
from shared.times import utc

# The routes of this router both styles share (retry, cancel, stats, metrics: the queue management
# API has them too) take the style of each request (services/gateway/document_style.py): errors too.
router = APIRouter(prefix="/api/queue", tags=["queue"], responses=EITHER_API_PROBLEMS, route_class=EitherStyleRoute)

TimeRange = Literal["24h", "7d", "30d", "all"]


@router.post("/pause", response_model=PauseState)
async def pause_queue(project: ProjectDep, services: ServicesDep) -> PauseState:
    """Running runs finish; no new run of this project starts until resumed."""
    await services.store.set_paused(project, True)
    return PauseState(paused=True)


@router.post("/resume", response_model=PauseState)
async def resume_queue(project: ProjectDep, services: ServicesDep) -> PauseState:
    await services.store.set_paused(project, False)
    return PauseState(paused=False)


RetryBody = Annotated[
    Annotated[RetryMany, Tag("native")] | Annotated[RetryDocument, Tag("document")], Discriminator(body_style)
]
CancelBody = Annotated[
    Annotated[CancelMany, Tag("native")] | Annotated[CancelDocument, Tag("document")], Discriminator(body_style)
]


@router.post("/cancel", response_model=CancelCount | CanceledDocument, responses=either_problems(404))
async def cancel_jobs(
    body: Annotated[CancelBody, Body()], project: ProjectDep, services: ServicesDep
) -> CancelCount | CanceledDocument:
    """The named jobs (`job_ids`), or every queued and processing job of the project. In the
    document style: the jobs of the named batches (`batchIds`), or every one of the project."""
    if isinstance(body, CancelDocument):
        check_project(body.project_id, project)
        count, reset = await cancel_batches(services, project, body.batch_ids)
        return CanceledDocument(
            canceled_count=count, batches_reset=reset, message=f"Canceled {count} job(s) of {reset} batch(es)."
        )
    job_ids = body.job_ids if body.job_ids is not None else await services.projects.live_job_ids(project)
    jobs = [job for job in await services.store.get_many(job_ids) if job.project == project]
    return CancelCount(canceled_count=await cancel_each(services, jobs))


@router.post(
    "/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RetriedList | RetriedDocument,
    responses=either_problems(402, 404, 409),
)
@idempotent
async def retry_jobs(
    body: Annotated[RetryBody, Body()], project: ProjectDep, services: ServicesDep
) -> RetriedList | RetriedDocument:
    """One failed job, or every failed job of the project not retried yet; each retry is a job of
    its own (`retry_of` the failed one)."""
    if isinstance(body, RetryDocument):
        check_project(body.project_id, project)
    retried = await _retry_failed(services, project, body.job_id)
    if isinstance(body, RetryDocument):
        new_ids = [r.id for r in retried]
        return RetriedDocument(message=f"Retrying {len(new_ids)} failed job(s).", job_ids=new_ids)
    return RetriedList(retried=retried)


async def _retry_failed(services: Services, project: str, job_id: str | None) -> list[Retried]:
    store = services.store
    if job_id:
        job = await store.get_for_project(project, job_id)
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
        accepted = await resubmit(services, project, job, config, budget_checked=True)
        retried.append(Retried(id=accepted.id, retry_of=job.id))
    return retried


@router.get("/stats", response_model=QueueStats | DocumentStats, responses=either_problems(404))
async def get_queue_stats(
    project: ProjectDep,
    services: ServicesDep,
    project_id: Annotated[str | None, Query(alias="projectId", max_length=200)] = None,
) -> QueueStats | DocumentStats:
    """With `projectId` (the document style): the document's counts and worker figures."""
    state, settings = await services.projects.state(project), services.settings
    if project_id is not None:
        check_project(project_id, project)
        queue, worker = document_stats(services, state)
        return DocumentStats(queue=queue, worker=worker)
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


@router.get("/metrics", response_model=QueueMetrics | DocumentMetrics, responses=either_problems(404))
async def get_queue_metrics(
    project: ProjectDep,
    services: ServicesDep,
    time_range: Annotated[TimeRange, Query()] = "24h",
    document_time_range: Annotated[TimeRange | None, Query(alias="timeRange")] = None,
    project_id: Annotated[str | None, Query(alias="projectId", max_length=200)] = None,
) -> QueueMetrics | DocumentMetrics:
    """The project's figures over the time range, from hourly counts: the cost grows with the hours
    in the range, never with its jobs. With `timeRange` or `projectId` (the document style):
    the document's figures, durations in milliseconds."""
    if document_time_range is not None or project_id is not None:
        check_project(project_id, project)
        figures = await services.projects.hourly(project, first_hour=first_hour_of(document_time_range or "24h"))
        return DocumentMetrics(stats=document_metrics(figures))
    figures = await services.projects.hourly(project, first_hour=first_hour_of(time_range))
    gemini, runpod = figures.total("gemini_micros"), figures.total("runpod_micros")
    return QueueMetrics(
        time_range=time_range,
        success_rate=figures.success_rate,
        avg_duration_s=_rounded(figures.average_seconds, 3),
        min_duration_s=_rounded(figures.shortest_seconds, 3),
        max_duration_s=_rounded(figures.longest_seconds, 3),
        jobs_finished=figures.total("jobs"),
        images_succeeded=figures.total("succeeded"),
        images_failed=figures.total("failed"),
        total_tokens=figures.total("tokens"),
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
            for hour, h in sorted(figures.by_hour.items())
        ],
    )


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
