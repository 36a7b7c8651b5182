"""The queue management API of the document style (docs/compatible_api.md) over Bunch's own stores
and scripts: each function here maps the document's request onto what the native routes do and
the answer back onto the document's shape. Nothing is queued, canceled or counted another way."""

import time
from collections.abc import Sequence

from services.gateway.deps import Services
from services.gateway.job_views import project_job, zip_info
from services.gateway.quotes import budget_of, check_budget
from services.gateway.schemas.queue_documents import (
    DocumentHour,
    DocumentMetricFigures,
    DocumentQueueCounts,
    DocumentWorker,
    QueueJob,
)
from services.gateway.submissions import check, submit
from shared import keys
from shared.errors import Conflict, Invalid
from shared.models import FINAL_JOB_STATUSES, AutomaticJobRequest, JobStatus, SemiAutoJobRequest
from shared.planning import JobConfig
from shared.pricing import usd
from shared.stores.projects import HourlyFigures, ProjectState
from shared.stores.records import JobRecord
from shared.stores.saved_batches import SavedBatch, column_index
from shared.times import utc

# Bunch's statuses in the document's vocabulary: a job being packaged is still processing.
DOCUMENT_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.PROCESSING: "processing",
    JobStatus.PACKAGING: "processing",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}
RETRY_CHAIN_LOOKS = 10  # earlier jobs followed back when counting a job's attempts


async def document_job(services: Services, project: str, job_id: str) -> QueueJob:
    job = await project_job(services.store, project, job_id)
    earlier, cursor = 0, job.retry_of
    while cursor and earlier < RETRY_CHAIN_LOOKS:
        earlier += 1
        cursor = await services.redis.hget(keys.job(cursor), "retry_of")
    data = {
        "batchId": job.batch_id,
        "mode": job.mode,
        "lane": job.lane,
        "group": job.group,
        "groupId": job.group_id,
        "progress": {
            "current": job.images_succeeded + job.images_failed,
            "total": job.images_total,
            "succeeded": job.images_succeeded,
            "failed": job.images_failed,
            "runsDone": job.runs_done,
            "runsTotal": job.runs_total,
        },
        "retryOf": job.retry_of,
        "retriedBy": job.retried_by,
        "zipUrl": zip_info(job, services.storage).url,
        "costUsd": job.cost()["total_usd"],
    }
    return QueueJob(
        id=job.id,
        status=DOCUMENT_STATUS[job.status],
        priority=job.priority,
        data=data,
        attempts=earlier + (1 if job.started_at else 0),
        max_attempts=services.settings.max_run_attempts,
        created_at=utc(job.created_at),
        started_at=utc(job.started_at),
        completed_at=utc(job.completed_at),
        error=job.error,
    )


async def unfinished_jobs(services: Services, batch_id: str) -> list[JobRecord]:
    jobs = await services.store.get_many(await services.saved_batches.job_ids(batch_id))
    return [job for job in jobs if job.status not in FINAL_JOB_STATUSES]


async def cancel_each(services: Services, jobs: Sequence[JobRecord]) -> int:
    """Cancels those still queued or processing (a job being packaged is past canceling)."""
    count = 0
    for job in jobs:
        if job.status in (JobStatus.QUEUED, JobStatus.PROCESSING):
            done, _ = await services.store.cancel(job.id)
            count += done
    return count


async def enqueue(services: Services, project: str, batch_ids: list[str], priority: int) -> tuple[list[str], int]:
    """A job per batch, each batch's unfinished jobs canceled first: (new job ids, canceled count).
    Everything is checked (each batch exists, each job is valid, the budget has room for all) before
    anything is canceled or queued."""
    batches = [await services.saved_batches.find(project, batch_id) for batch_id in batch_ids]
    configs = [batch.config.model_copy(update={"priority": priority}) for batch in batches]
    for config in configs:
        await check(services, project, config)
    await check_budget(services, project, configs)
    canceled = 0
    for batch in batches:
        canceled += await cancel_each(services, await unfinished_jobs(services, batch.id))
    job_ids = []
    for batch, config in zip(batches, configs, strict=True):
        accepted = await submit(services, project, config, budget_checked=True, batch_id=batch.id)
        job_ids.append(accepted.id)
    return job_ids, canceled


async def cancel_batches(services: Services, project: str, batch_ids: list[str] | None) -> tuple[int, int]:
    """(jobs canceled, batches of which one was): the named batches' jobs, or every queued and
    processing job of the project."""
    if batch_ids is None:
        jobs = await services.store.get_many(await services.projects.live_job_ids(project))
        jobs = [job for job in jobs if job.project == project]
        canceled_batches: set[str] = set()
        count = 0
        for job in jobs:
            done = await cancel_each(services, [job])
            count += done
            if done and job.batch_id:
                canceled_batches.add(job.batch_id)
        return count, len(canceled_batches)
    batches = [await services.saved_batches.find(project, batch_id) for batch_id in dict.fromkeys(batch_ids)]
    count = reset = 0
    for batch in batches:
        done = await cancel_each(services, await unfinished_jobs(services, batch.id))
        count += done
        reset += done > 0
    return count, reset


async def redo_row(
    services: Services,
    project: str,
    batch: SavedBatch,
    row: int,
    columns: list[str],
    replacements: dict[str, str],
    priority: int,
) -> list[str]:
    """Those columns of that row of the batch's latest job made again. Columns without a replaced
    image are redone in that job itself (as POST /api/jobs/{id}/redo); each distinct replacement
    image makes a job of its own for its columns, from the row's prompt with that image as the
    row's source (automatic: its input; semi-automatic: its first reference). Returns the job ids,
    the latest job's first when it redoes any."""
    if row >= batch.rows:
        raise Invalid(f"rowIndex: {row} is outside this batch's rows 0..{batch.rows - 1}.")
    indices: dict[str, int] = {}
    for column in dict.fromkeys(columns):
        found = column_index(column, batch.columns)
        if found is None:
            raise Invalid(f"redoColumnIds: {column!r} is not a column of this batch (v0..v{batch.columns - 1}).")
        indices[column] = found
    stray = sorted(set(replacements) - set(indices))
    if stray:
        raise Invalid(f"croppedImageIds / sourceImageIds: {stray[:10]} are not among redoColumnIds.")
    latest_id = await services.saved_batches.latest_job_id(batch.id)
    if latest_id is None:
        raise Conflict("This batch has no job yet: enqueue it first.")
    latest = await project_job(services.store, project, latest_id)
    config = await services.store.config(latest.id)
    source = _row_source(config, row)
    in_place = [indices[c] for c in indices if replacements.get(c, source) == source]
    by_image: dict[str, int] = {}
    for column in indices:
        image = replacements.get(column, source)
        if image != source and image is not None:
            by_image[image] = by_image.get(image, 0) + 1
    new_configs = [_replaced(config, row, image, count, priority) for image, count in by_image.items()]
    if in_place and latest.status not in FINAL_JOB_STATUSES:
        raise Conflict(f"The batch's latest job is {latest.status.value}; its images can be redone once it ends.")
    for new in new_configs:
        await check(services, project, new)
    if budget_of(services.settings, project) is not None:
        # Each part priced as it runs: the redo of the latest job's images, and each new job.
        if in_place:
            await check_budget(services, project, [config], [batch.image_index(row, i) for i in sorted(in_place)])
        await check_budget(services, project, new_configs)
    job_ids = []
    if in_place:
        done, detail = await services.store.redo(latest.id, [batch.image_index(row, i) for i in in_place])
        if not done:
            raise Conflict(f"Only completed or failed jobs can redo images; this one is {detail}.")
        await services.store.set_priority(latest.id, priority)
        job_ids.append(latest.id)
    for new in new_configs:
        job_ids.append((await submit(services, project, new, budget_checked=True)).id)
    return job_ids


def _row_source(config: JobConfig, row: int) -> str | None:
    """The image a row is made from: automatic, its input; semi-automatic, the first reference."""
    if isinstance(config, AutomaticJobRequest):
        return config.input_ids[row]
    return config.reference_ids[0] if config.reference_ids else None


def _replaced(config: JobConfig, row: int, image: str, count: int, priority: int) -> JobConfig:
    if isinstance(config, SemiAutoJobRequest):
        return config.model_copy(
            update={
                "prompts": [config.prompts[row]],
                "images_per_prompt": count,
                "reference_ids": [image, *config.reference_ids[1:]],
                "priority": priority,
            }
        )
    return config.model_copy(
        update={"input_ids": [image], "dataset_id": None, "variations_per_image": count, "priority": priority}
    )


def document_stats(services: Services, state: ProjectState) -> tuple[DocumentQueueCounts, DocumentWorker]:
    counts = state.jobs_by_status
    settings = services.settings
    processing = counts.get("processing", 0) + counts.get("packaging", 0)
    queue = DocumentQueueCounts(
        queued=counts.get("queued", 0),
        processing=processing,
        completed=counts.get("completed", 0),
        failed=counts.get("failed", 0),
        total_jobs=sum(counts.values()),
    )
    worker = DocumentWorker(
        is_running=not state.paused and state.hold is None,
        active_jobs=processing,
        requests_per_minute=settings.dispatch_rpm,
        max_concurrency=min(settings.max_concurrency, settings.project_max_concurrency or settings.max_concurrency),
    )
    return queue, worker


def document_metrics(figures: HourlyFigures) -> DocumentMetricFigures:
    """The project's hourly figures with durations in milliseconds."""

    def milliseconds(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000)

    return DocumentMetricFigures(
        success_rate=figures.success_rate,
        avg_duration=milliseconds(figures.average_seconds),
        min_duration=milliseconds(figures.shortest_seconds),
        max_duration=milliseconds(figures.longest_seconds),
        total_tokens=figures.total("tokens"),
        hourly_breakdown=[
            DocumentHour(
                hour=utc(hour * 3600),
                completed=int(h.get("succeeded", 0)),
                failed=int(h.get("failed", 0)),
                tokens=int(h.get("tokens", 0)),
                cost_usd=usd(h.get("gemini_micros", 0) + h.get("runpod_micros", 0)),
            )
            for hour, h in sorted(figures.by_hour.items())
        ],
    )


TIME_RANGES = {"24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400, "all": None}


def first_hour_of(time_range: str) -> int:
    """The first hour (unix seconds // 3600) a metrics time range covers."""
    window = TIME_RANGES[time_range]
    return 0 if window is None else int((time.time() - window) // 3600)
