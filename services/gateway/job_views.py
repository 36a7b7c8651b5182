"""The views of a job that several routes answer with: its status, its ZIP, a page of its images."""

from typing import Any

from services.gateway.schemas.jobs import JobCost, JobStatusView, Progress, ZipInfo
from shared import planning
from shared.errors import NotFound
from shared.models import ImageStatus, JobStatus, SemiAutoJobRequest
from shared.planning import JobConfig
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.records import NO_FIGURES, ImageRecord, JobRecord, QueueFigures
from shared.times import iso, utc

JOB_NOT_FOUND = "No such job in this project."


async def project_job(store: JobStore, project: str, job_id: str) -> JobRecord:
    """The job, if it is the project's; else NotFound (another project's job is not shown to exist)."""
    job = await store.get_for_project(project, job_id)
    if job is None:
        raise NotFound(JOB_NOT_FOUND)
    return job


def zip_info(job: JobRecord, storage: Storage) -> ZipInfo:
    # Signed on every read: an old job's link works for as long as its data is kept.
    if job.zip_key is None or job.status not in (JobStatus.COMPLETED, JobStatus.CANCELED):
        return ZipInfo(ready=False)
    return ZipInfo(ready=True, bytes=job.zip_bytes, url=storage.presigned_get(job.zip_key, f"bunch-{job.id}.zip"))


def progress(job: JobRecord) -> Progress:
    return Progress(
        images_total=job.images_total,
        images_succeeded=job.images_succeeded,
        images_failed=job.images_failed,
        runs_total=job.runs_total,
        runs_done=job.runs_done,
    )


async def status_fields(job: JobRecord, store: JobStore, storage: Storage, *, live: bool = True) -> dict[str, Any]:
    """The status view's fields; `live` adds the queue figures, which cost a script call."""
    return fields_with(job, await store.queue_figures(job) if live else NO_FIGURES, storage)


def fields_with(job: JobRecord, figures: QueueFigures, storage: Storage) -> dict[str, Any]:
    waiting, running = figures.wait_seconds, figures.run_seconds
    eta = None if waiting is None or running is None else round(waiting + running, 1)
    return {
        "id": job.id,
        "status": job.status,
        "mode": job.mode,
        "lane": job.lane,
        "group": job.group,
        "group_id": job.group_id,
        "priority": job.priority,
        "progress": progress(job),
        "queue_position": figures.position,
        "eta_seconds": eta,
        "eta_wait_seconds": waiting,
        "eta_run_seconds": running,
        "error": job.error,
        "created_at": utc(job.created_at),
        "started_at": utc(job.started_at),
        "completed_at": utc(job.completed_at),
        "zip": zip_info(job, storage),
        "retry_of": job.retry_of,
        "retried_by": job.retried_by,
        "cost": JobCost(**job.cost()),
    }


async def status_view(job: JobRecord, store: JobStore, storage: Storage, *, live: bool = True) -> JobStatusView:
    return JobStatusView(**await status_fields(job, store, storage, live=live))


async def live_status_view(store: JobStore, storage: Storage, project: str, job_id: str) -> JobStatusView:
    """GET status's view: the job and its queue figures come from one Redis call."""
    found = await store.status_for_project(project, job_id)
    if found is None:
        raise NotFound(JOB_NOT_FOUND)
    return JobStatusView(**fields_with(*found, storage))


def results_page(
    job: JobRecord, config: JobConfig, records: dict[int, ImageRecord], indices: range, storage: Storage
) -> dict[str, Any]:
    """One page of GET /results as JSON-ready data, in the shape of schemas.jobs.JobResults."""
    images: list[dict[str, Any]] = []
    prompts: dict[int, str] = {}
    for index in indices:
        record, slot = records.get(index), planning.slot(config, index)
        prompt_index = planning.prompt_index(config, index)
        prompts.setdefault(prompt_index, slot.prompt)
        url = None
        if record is not None and record.object_key and record.status == ImageStatus.SUCCEEDED:
            url = storage.presigned_get(record.object_key, f"{index:05d}.png")
        images.append(
            {
                "index": index,
                "status": record.status.value if record else ImageStatus.PENDING.value,
                "url": url,
                "prompt_index": prompt_index,
                "input_id": slot.input_id,
                "created_at": iso(record.finished_at) if record else None,
                "error": record.error if record else None,
                "detail": record.detail if record else None,
            }
        )
    end = indices.stop
    return {
        "id": job.id,
        "status": job.status.value,
        "images_total": job.images_total,
        "prompts": prompts,
        "reference_ids": list(config.reference_ids) if isinstance(config, SemiAutoJobRequest) else [],
        "images": images,
        "next_cursor": str(end) if end < job.images_total else None,
        "zip": zip_info(job, storage).model_dump(mode="json"),
        "cost": job.cost(),
    }
