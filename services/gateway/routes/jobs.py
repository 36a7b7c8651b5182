"""/api/jobs: submit, list, status, details, results, download, and control of one job."""

import json
from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status
from fastapi.responses import RedirectResponse

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.job_views import live_status_view, project_job, results_page, status_fields, status_view, zip_info
from services.gateway.quotes import budget_of, check_budget, quote
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.jobs import (
    Canceled,
    JobAccepted,
    JobList,
    JobQuote,
    JobRequest,
    JobResults,
    JobStatusView,
    JobView,
    PriorityChange,
    RedoRequest,
)
from services.gateway.submissions import check, located, resubmit, submit
from shared.errors import Conflict, Invalid
from shared.models import FINAL_JOB_STATUSES, RETRYABLE_JOB_STATUSES, JobStatus

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=API_PROBLEMS, route_class=IdempotentRoute)

NOT_FOUND = problems(404)
NOT_FOUND_OR_CONFLICT = problems(404, 409)
OVER_BUDGET = problems(402)
MAX_EXAMINED = 1000  # jobs a filtered listing looks at per request
MAX_RESULTS_PAGE = 200  # images per page of /results: a few ms of the event loop, some 100 KB
INDEX_PAGE = 200  # jobs read from the project's index per Redis call


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=OVER_BUDGET)
@router.post("/submit", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, include_in_schema=False)
@idempotent
async def submit_job(
    config: Annotated[JobRequest, Body()], project: ProjectDep, services: ServicesDep, response: Response
) -> JobAccepted:
    return located(response, await submit(services, project, config))


# Before any /{job_id} route, so "quote" is never read as a job id.
@router.post("/quote", response_model=JobQuote)
async def quote_job(config: Annotated[JobRequest, Body()], project: ProjectDep, services: ServicesDep) -> JobQuote:
    """What the job would cost and take in each lane, and where it leaves the project's budget:
    the body of POST /api/jobs, checked the same way; nothing is created."""
    checked = await check(services, project, config)
    return await quote(services, project, checked.config)


@router.get("", response_model=JobList)
async def list_jobs(
    project: ProjectDep,
    services: ServicesDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    group: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d+(\.\d+)?$")] = None,
) -> JobList:
    """Newest first; `cursor` is the `next_cursor` of the previous page. With a filter, one request
    looks at no more than MAX_EXAMINED jobs, so its cost does not grow with the project's history:
    a page may then hold fewer than `limit` jobs (even none) and still have a `next_cursor`."""
    views: list[JobStatusView] = []
    upper = f"({cursor}" if cursor else "+inf"
    examined = 0
    while len(views) < limit:
        if examined >= MAX_EXAMINED:
            return JobList(jobs=views, next_cursor=upper[1:])
        page = await services.projects.jobs_before(project, upper, INDEX_PAGE)
        if not page:
            return JobList(jobs=views, next_cursor=None)
        examined += len(page)
        jobs = {job.id: job for job in await services.store.get_many([job_id for job_id, _ in page])}
        for job_id, score in page:
            upper = f"({score!r}"
            job = jobs.get(job_id)
            if job is None or (status_filter and job.status != status_filter):
                continue
            if group and group not in (job.group, job.group_id):
                continue
            views.append(await status_view(job, services.store, services.storage, live=False))
            if len(views) == limit:
                break
    return JobList(jobs=views, next_cursor=upper[1:])


@router.get("/{job_id}/status", response_model=JobStatusView, responses=NOT_FOUND)
async def get_job_status(job_id: str, project: ProjectDep, services: ServicesDep) -> JobStatusView:
    return await live_status_view(services.store, services.storage, project, job_id)


@router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
async def get_job(job_id: str, project: ProjectDep, services: ServicesDep) -> JobView:
    job = await project_job(services.store, project, job_id)
    config = await services.store.config(job_id)
    fields = await status_fields(job, services.store, services.storage)
    return JobView(**fields, config=config.model_dump(mode="json"))


@router.patch("/{job_id}", response_model=JobStatusView, responses=NOT_FOUND_OR_CONFLICT)
async def change_job_priority(
    job_id: str, change: PriorityChange, project: ProjectDep, services: ServicesDep
) -> JobStatusView:
    job = await project_job(services.store, project, job_id)
    if not await services.store.set_priority(job_id, change.priority):
        raise Conflict(f"The job is {job.status.value} with every run started; its priority can no longer change.")
    return await status_view(await project_job(services.store, project, job_id), services.store, services.storage)


@router.post("/{job_id}/cancel", response_model=Canceled, responses=NOT_FOUND_OR_CONFLICT)
async def cancel_job(job_id: str, project: ProjectDep, services: ServicesDep) -> Canceled:
    await project_job(services.store, project, job_id)
    done, detail = await services.store.cancel(job_id)
    if not done:
        raise Conflict(f"The job is already {detail}; only queued or processing jobs can be canceled.")
    return Canceled(id=job_id, status=JobStatus.CANCELED, runs_stopped=int(detail))


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobAccepted,
    responses={**NOT_FOUND_OR_CONFLICT, **OVER_BUDGET},
)
@idempotent
async def retry_job(job_id: str, project: ProjectDep, services: ServicesDep, response: Response) -> JobAccepted:
    job = await project_job(services.store, project, job_id)
    if job.status not in RETRYABLE_JOB_STATUSES:
        raise Conflict(f"Only failed or canceled jobs can be retried; this one is {job.status.value}.")
    return located(response, await resubmit(services, project, job))


@router.post(
    "/{job_id}/redo",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobStatusView,
    responses={**NOT_FOUND_OR_CONFLICT, **OVER_BUDGET},
)
@idempotent
async def redo_job_images(job_id: str, redo: RedoRequest, project: ProjectDep, services: ServicesDep) -> JobStatusView:
    job = await project_job(services.store, project, job_id)
    outside = [i for i in redo.indices if not 0 <= i < job.images_total]
    if outside:
        raise Invalid(f"indices: {outside[:10]} are outside this job's images 0..{job.images_total - 1}.")
    # Priced only when there is a budget to check and the redo may happen (else 409 below).
    if job.status in FINAL_JOB_STATUSES and budget_of(services.settings, project) is not None:
        indices = sorted(set(redo.indices))
        await check_budget(services, project, [await services.store.config(job_id)], indices)
    done, detail = await services.store.redo(job_id, redo.indices)
    if not done:
        raise Conflict(f"Only completed or failed jobs can redo images; this one is {detail}.")
    return await status_view(await project_job(services.store, project, job_id), services.store, services.storage)


@router.get("/{job_id}/results", response_model=JobResults, responses=NOT_FOUND)
async def get_job_results(
    job_id: str,
    project: ProjectDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_PAGE)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$")] = None,
) -> Response:
    """The job's images from index `cursor` (the `next_cursor` of the previous page) on, `limit` at
    a time: a page costs the same whatever the job's size."""
    async with services.heavy_reads.slot(project):
        job = await project_job(services.store, project, job_id)
        start = min(int(cursor or 0), job.images_total)
        count = min(limit, job.images_total - start)
        config, records = await services.store.records_page(job_id, start, count)
        page = results_page(job, config, records, range(start, start + count), services.storage)
    # Built as plain data and written once: validating and dumping hundreds of models per page
    # would hold the event loop (every project's requests) several times longer.
    return Response(json.dumps(page, separators=(",", ":")), media_type="application/json")


@router.get(
    "/{job_id}/download",
    status_code=status.HTTP_302_FOUND,
    responses={
        302: {"description": "Redirect to the ZIP (a presigned link)"},
        **problems(404, 409, described={409: "The ZIP is not ready"}),
    },
)
async def download_job(job_id: str, project: ProjectDep, services: ServicesDep) -> RedirectResponse:
    job = await project_job(services.store, project, job_id)
    info = zip_info(job, services.storage)
    if not info.ready or info.url is None:
        if job.status in FINAL_JOB_STATUSES:
            raise Conflict(f"The job ended {job.status.value} without a ZIP: {job.error or 'no images'}.")
        raise Conflict(f"The ZIP is not ready: the job is {job.status.value}. Try again when it is completed.")
    return RedirectResponse(info.url, status_code=status.HTTP_302_FOUND)
