"""The job routes: submit, list, status, details, results, download, and control of one job."""

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response, status
from fastapi.responses import RedirectResponse

from services.gateway.datasets import dataset_input_ids
from services.gateway.deps import ProjectDep, RedisDep, ServicesDep, SettingsDep, StorageDep, StoreDep
from services.gateway.groups import could_be_group_id, resolve_group
from services.gateway.schemas import (
    API_PROBLEMS,
    Canceled,
    JobAccepted,
    JobLinks,
    JobList,
    JobRequest,
    JobResults,
    JobStatusView,
    JobView,
    PriorityChange,
    RedoRequest,
    problems,
)
from services.gateway.views import job_or_404, live_status_view, results_page, status_fields, status_view, zip_info
from shared import keys, planning
from shared.jobstore import JobStore, MissingKeys
from shared.models import (
    FINAL_JOB_STATUSES,
    AutomaticJobRequest,
    JobStatus,
    SemiAutoJobRequest,
)
from shared.planning import JobConfig
from shared.settings import Settings
from shared.webhook_safety import webhook_url_problem

router = APIRouter(prefix="/api/jobs", tags=["jobs"], responses=API_PROBLEMS)

NOT_FOUND = problems(404)
MAX_EXAMINED = 1000  # jobs a filtered listing looks at per request
MAX_RESULTS_PAGE = 200  # images per page of /results: a few ms of the event loop, some 100 KB
NOT_FOUND_OR_CONFLICT = problems(404, 409)


async def _validate(config: JobConfig, settings: Settings) -> list[str]:
    """What pydantic cannot know: limits from settings. Returns the distinct upload ids the job names,
    whose existence is checked when its group is resolved."""
    prompts = config.prompts if isinstance(config, SemiAutoJobRequest) else [config.base_prompt]
    too_long = [n for n, prompt in enumerate(prompts) if len(prompt) > settings.max_prompt_chars]
    if too_long:
        where = "base_prompt" if isinstance(config, AutomaticJobRequest) else f"prompts {too_long[:10]}"
        raise HTTPException(422, f"{where}: at most {settings.max_prompt_chars} characters per prompt.")
    if isinstance(config, SemiAutoJobRequest):
        upload_ids = config.reference_ids
        if len(config.prompts) > settings.max_prompts:
            raise HTTPException(422, f"Too many prompts: {len(config.prompts)}; at most {settings.max_prompts}.")
        if len(upload_ids) > settings.max_references:
            raise HTTPException(
                422, f"Too many reference images: {len(upload_ids)}; at most {settings.max_references}."
            )
    else:
        upload_ids = config.input_ids
        if len(upload_ids) > settings.max_inputs_per_job:
            raise HTTPException(
                422, f"Too many input images: {len(upload_ids)}; at most {settings.max_inputs_per_job}."
            )
    if config.webhook_url:
        problem = await asyncio.to_thread(webhook_url_problem, config.webhook_url, settings.allow_private_webhooks)
        if problem:
            raise HTTPException(422, f"webhook_url: {problem}")
    total = planning.images_total(config)
    if total > settings.max_images_per_job:
        raise HTTPException(422, f"The job asks for {total} images; at most {settings.max_images_per_job} per job.")
    return list(dict.fromkeys(upload_ids))


def _links(job_id: str) -> JobLinks:
    base = f"/api/jobs/{job_id}"
    return JobLinks(
        status=f"{base}/status", results=f"{base}/results", download=f"{base}/download", events=f"{base}/events"
    )


async def accept(
    config: JobConfig, project: str, store: JobStore, settings: Settings, redis: RedisDep, retry_of: str | None = None
) -> JobAccepted:
    if isinstance(config, AutomaticJobRequest) and config.dataset_id:
        inputs = await dataset_input_ids(redis, project, config.dataset_id)
        if inputs is None:
            raise HTTPException(422, f"Unknown dataset_id {config.dataset_id!r}: upload it with POST /api/datasets.")
        await redis.zadd(keys.DATASETS_BY_USE, {config.dataset_id: time.time()}, gt=True)  # retention keeps it
        # The job keeps the dataset's ids: later changes to the dataset do not change the job.
        config = config.model_copy(update={"input_ids": inputs})
    upload_ids = await _validate(config, settings)
    required = [keys.upload(project, upload_id) for upload_id in upload_ids]
    try:
        if could_be_group_id(config.group):
            # The job stores its group's name: look a group id up first.
            group_id, group_name = await resolve_group(redis, project, config.group, required=required)
            config = config.model_copy(update={"group": group_name})
            job = await store.create(project, config, group_id=group_id, retry_of=retry_of)
        else:  # a name is the group's name: one call checks, resolves and creates
            job = await store.create(project, config, group_name=config.group, retry_of=retry_of, required=required)
    except MissingKeys as exc:
        missing = [upload_ids[i] for i in exc.indices]
        raise HTTPException(
            422, f"Unknown upload ids: {', '.join(missing[:10])}. Upload the images with POST /api/uploads first."
        ) from None
    return JobAccepted(id=job.id, status=job.status, links=_links(job.id))


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted)
@router.post("/submit", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, include_in_schema=False)
async def submit_job(config: Annotated[JobRequest, Body()], project: ProjectDep, services: ServicesDep) -> JobAccepted:
    return await accept(config, project, services.store, services.settings, services.redis)


@router.get("", response_model=JobList)
async def list_jobs(
    project: ProjectDep,
    store: StoreDep,
    storage: StorageDep,
    redis: RedisDep,
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
        page = await redis.zrevrangebyscore(
            keys.project_jobs(project), upper, "-inf", start=0, num=200, withscores=True
        )
        if not page:
            return JobList(jobs=views, next_cursor=None)
        examined += len(page)
        jobs = {job.id: job for job in await store.get_many([job_id for job_id, _ in page])}
        for job_id, score in page:
            upper = f"({score!r}"
            job = jobs.get(job_id)
            if job is None or (status_filter and job.status != status_filter):
                continue
            if group and group not in (job.group, job.group_id):
                continue
            views.append(await status_view(job, store, storage, live=False))
            if len(views) == limit:
                break
    return JobList(jobs=views, next_cursor=upper[1:])


@router.get("/{job_id}/status", response_model=JobStatusView, responses=NOT_FOUND)
async def job_status(job_id: str, project: ProjectDep, services: ServicesDep) -> JobStatusView:
    return await live_status_view(services.store, services.storage, project, job_id)


@router.get("/{job_id}", response_model=JobView, responses=NOT_FOUND)
async def job_details(job_id: str, project: ProjectDep, store: StoreDep, storage: StorageDep) -> JobView:
    job = await job_or_404(store, project, job_id)
    config = await store.config(job_id)
    return JobView(**await status_fields(job, store, storage), config=config.model_dump(mode="json"))


@router.patch("/{job_id}", response_model=JobStatusView, responses=NOT_FOUND_OR_CONFLICT)
async def change_priority(
    job_id: str, change: PriorityChange, project: ProjectDep, store: StoreDep, storage: StorageDep
) -> JobStatusView:
    job = await job_or_404(store, project, job_id)
    if not await store.set_priority(job_id, change.priority):
        raise HTTPException(
            409, f"The job is {job.status.value} with every run started; its priority can no longer change."
        )
    return await status_view(await job_or_404(store, project, job_id), store, storage)


@router.post("/{job_id}/cancel", response_model=Canceled, responses=NOT_FOUND_OR_CONFLICT)
async def cancel_job(job_id: str, project: ProjectDep, store: StoreDep) -> Canceled:
    await job_or_404(store, project, job_id)
    done, detail = await store.cancel(job_id)
    if not done:
        raise HTTPException(409, f"The job is already {detail}; only queued or processing jobs can be canceled.")
    return Canceled(id=job_id, status=JobStatus.CANCELED, runs_stopped=int(detail))


@router.post(
    "/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=NOT_FOUND_OR_CONFLICT
)
async def retry_job(
    job_id: str, project: ProjectDep, store: StoreDep, settings: SettingsDep, redis: RedisDep
) -> JobAccepted:
    job = await job_or_404(store, project, job_id)
    if job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
        raise HTTPException(409, f"Only failed or canceled jobs can be retried; this one is {job.status.value}.")
    return await accept(await store.config(job_id), project, store, settings, redis, retry_of=job_id)


@router.post(
    "/{job_id}/redo",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobStatusView,
    responses=NOT_FOUND_OR_CONFLICT,
)
async def redo_images(
    job_id: str, redo: RedoRequest, project: ProjectDep, store: StoreDep, storage: StorageDep
) -> JobStatusView:
    job = await job_or_404(store, project, job_id)
    outside = [i for i in redo.indices if not 0 <= i < job.images_total]
    if outside:
        raise HTTPException(422, f"indices: {outside[:10]} are outside this job's images 0..{job.images_total - 1}.")
    done, detail = await store.redo(job_id, redo.indices)
    if not done:
        raise HTTPException(409, f"Only completed or failed jobs can redo images; this one is {detail}.")
    return await status_view(await job_or_404(store, project, job_id), store, storage)


@router.get("/{job_id}/results", response_model=JobResults, responses=NOT_FOUND)
async def job_results(
    job_id: str,
    request: Request,
    project: ProjectDep,
    store: StoreDep,
    storage: StorageDep,
    limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_PAGE)] = 100,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$")] = None,
) -> Response:
    """The job's images from index `cursor` (the `next_cursor` of the previous page) on, `limit` at
    a time: a page costs the same whatever the job's size."""
    async with request.app.state.heavy_reads.slot(project):
        job = await job_or_404(store, project, job_id)
        start = min(int(cursor or 0), job.images_total)
        count = min(limit, job.images_total - start)
        config, records = await store.records_page(job_id, start, count)
        page = results_page(job, config, records, range(start, start + count), storage)
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
async def download(job_id: str, project: ProjectDep, store: StoreDep, storage: StorageDep) -> RedirectResponse:
    job = await job_or_404(store, project, job_id)
    info = zip_info(job, storage)
    if not info.ready or info.url is None:
        if job.status in FINAL_JOB_STATUSES:
            raise HTTPException(409, f"The job ended {job.status.value} without a ZIP: {job.error or 'no images'}.")
        raise HTTPException(
            409, f"The ZIP is not ready: the job is {job.status.value}. Try again when it is completed."
        )
    return RedirectResponse(info.url, status_code=status.HTTP_302_FOUND)
