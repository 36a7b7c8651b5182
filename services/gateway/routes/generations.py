"""/api/generations: the job routes of the generations plan (docs: "Queue-Based Image Generation",
its sections 3, 3a and 3b), as thin adapters over Bunch's own jobs: polling a job, retrying it,
downloading what it made. Errors answer `{"success": false, "error": ...}` (DocumentRoute).

The plan's job statuses are not Bunch's; STATUS maps them:

    Bunch        the plan
    queued       queued
    processing   running
    packaging    running    (every image is done; the ZIP is being written)
    completed    success
    failed       failed     (every image failed, or the job could not run)
    canceled     canceled

A generation job here is any Bunch job (POST /api/jobs, or the queue routes): its "generation" is
what it made once completed, its ZIP (metadata.zipUrl) the one Bunch's packager writes.
"""

import json
import time
from collections.abc import AsyncIterator, Generator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, cast

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse
from minio.error import S3Error
from starlette.concurrency import run_in_threadpool

from services.gateway.deps import ProjectDep, Services, ServicesDep
from services.gateway.document_style import DocumentRoute
from services.gateway.idempotency import idempotent
from services.gateway.job_views import JOB_NOT_FOUND, project_job, zip_info
from services.gateway.schemas.common import document_problems
from services.gateway.schemas.generations import GenerationView, RetryAccepted, RetryJob
from services.gateway.submissions import resubmit
from shared import planning
from shared.errors import BunchError, Conflict, NotFound
from shared.models import RETRYABLE_JOB_STATUSES, ImageStatus, JobStatus
from shared.planning import JobConfig
from shared.storage import MISSING, Storage
from shared.stores.records import ImageRecord, JobRecord
from shared.times import iso, utc

STATUS: dict[JobStatus, str] = {
    JobStatus.QUEUED: "queued",
    JobStatus.PROCESSING: "running",
    JobStatus.PACKAGING: "running",
    JobStatus.COMPLETED: "success",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "canceled",
}
IMAGE_STATUS = {ImageStatus.SUCCEEDED: "success", ImageStatus.FAILED: "failed"}
# Image slots one poll looks at: what GET /api/jobs/{id}/results allows per page, so a poll of a
# 10,000-image job costs what a poll of a small one does.
MAX_IMAGES_PAGE = 200
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RETRY_QUEUED = "Retry job queued successfully"
NOT_COMPLETED = "Batch not completed yet"
NO_ZIP = "Zip file not available"
NO_IMAGE = "Image file not available"

router = APIRouter(
    prefix="/api/generations",
    tags=["generations"],
    route_class=DocumentRoute,
    responses=document_problems(401, 422, 503),
)


class NotCompleted(BunchError):
    """The job has not completed yet. The plan answers it 400 (Bunch's own routes say 409 for a
    state that forbids a request): a kind of its own, so it maps to BunchError's 400."""


@router.get("/{job_id}", response_model=GenerationView, responses=document_problems(404, 422))
async def get_generation(
    job_id: str,
    project: ProjectDep,
    services: ServicesDep,
    cursor: Annotated[int | None, Query(ge=0, le=999_999_999, description="`nextCursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_IMAGES_PAGE, description="Image slots per page")] = MAX_IMAGES_PAGE,
) -> Response:
    """The job, its generation once completed, and its finished images among slots `cursor` to
    `cursor + limit - 1`, as the plan's front-end polls them."""
    async with services.heavy_reads.slot(project):
        job = await project_job(services.store, project, job_id)
        start = min(cursor or 0, job.images_total)
        indices = range(start, start + min(limit, job.images_total - start))
        try:
            config, records = await services.store.records_page(job_id, indices.start, len(indices))
        except KeyError:  # deleted since it was read
            raise NotFound(JOB_NOT_FOUND) from None
        view = _view(job, config, records, indices, services.storage)
    # Plain data written once, as GET /api/jobs/{id}/results does: 200 models per poll validated
    # and dumped would hold the event loop (every project's requests) several times longer.
    return Response(json.dumps(view, separators=(",", ":")), media_type="application/json")


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=RetryAccepted,
    responses=document_problems(402, 404, 409, described={409: "The job is not failed or canceled"}),
)
@idempotent
async def retry_generation(job_id: str, project: ProjectDep, services: ServicesDep) -> RetryAccepted:
    """A new job with the failed (or canceled) job's parameters, as POST /api/jobs/{id}/retry queues it."""
    job = await project_job(services.store, project, job_id)
    if job.status not in RETRYABLE_JOB_STATUSES:
        raise Conflict(f"Can only retry failed or canceled jobs; this job is {STATUS[job.status]}.")
    accepted = await resubmit(services, project, job)
    queued = await services.store.get(accepted.id)
    created = queued.created_at if queued is not None else time.time()
    return RetryAccepted(
        job=RetryJob(id=accepted.id, status=STATUS[accepted.status], created_at=utc(created)),
        message=RETRY_QUEUED,
        original_job_id=job_id,
    )


@router.get(
    "/{job_id}/download",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The ZIP of the job's images; a one-image job's image itself",
            "content": {
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **document_problems(
            400, 404, described={400: "The job has not completed", 404: "No such job, or it has no ZIP (no image)"}
        ),
    },
)
async def download_generation(job_id: str, project: ProjectDep, services: ServicesDep) -> StreamingResponse:
    """The completed job's ZIP, streamed through the gateway; a one-image job's image instead."""
    job = await project_job(services.store, project, job_id)
    if job.status != JobStatus.COMPLETED:
        raise NotCompleted(NOT_COMPLETED)
    name = f"generation-{job.id}-{_milliseconds(job.completed_at or job.created_at)}"
    if job.images_total == 1:
        record = await _only_image(services, job)
        if record is None or record.object_key is None:
            raise NotFound(NO_IMAGE)
        ext = planning.EXTENSIONS.get(record.mime_type or "", "png")
        media_type = record.mime_type or "image/png"
        return await _stream(services.storage, record.object_key, media_type, f"{name}.{ext}", record.bytes, NO_IMAGE)
    info = zip_info(job, services.storage)
    if not info.ready or job.zip_key is None:
        raise NotFound(NO_ZIP)
    return await _stream(services.storage, job.zip_key, "application/zip", f"{name}.zip", job.zip_bytes, NO_ZIP)


def _milliseconds(seconds: float) -> int:
    """The moment as the plan's front-end reads the ISO time this API shows it as (to the
    microsecond): `new Date(completedAt).getTime()`. Integer arithmetic: no float rounding."""
    return (utc(seconds) - EPOCH) // timedelta(milliseconds=1)


def _view(
    job: JobRecord, config: JobConfig, records: dict[int, ImageRecord], indices: range, storage: Storage
) -> dict[str, Any]:
    """GET's answer as JSON-ready data, in the shape of schemas.generations.GenerationView."""
    images: list[dict[str, Any]] = []
    completed: list[int] = []
    for index in indices:
        record = records.get(index)
        if record is None or record.status not in IMAGE_STATUS:
            continue  # not finished (pending, or being redone)
        url = None
        if record.status == ImageStatus.SUCCEEDED:
            completed.append(index)
            if record.object_key:
                url = storage.presigned_get(record.object_key, planning.image_file_name(index, record.mime_type))
        images.append(
            {
                "id": f"{job.id}-{index}",
                "index": index,
                "url": url,
                "prompt": planning.slot(config, index).prompt,
                "status": IMAGE_STATUS[record.status],
                "error": record.error,
                "createdAt": iso(record.finished_at),
            }
        )
    zip_url = zip_info(job, storage).url
    status_name = STATUS[job.status]
    # No field of its own: the job's latest moment (created, started or ended).
    updated = max(moment for moment in (job.created_at, job.started_at, job.completed_at) if moment is not None)
    generation = None
    if job.status == JobStatus.COMPLETED:
        generation = {
            "id": job.id,
            "status": status_name,
            "imageCount": job.images_succeeded,
            "zipUrl": zip_url,
            "createdAt": iso(job.created_at),
            "completedAt": iso(job.completed_at),
        }
    return {
        "job": {
            "id": job.id,
            "type": "image_generation",
            "status": status_name,
            "progress": {
                "current": job.images_succeeded + job.images_failed,
                "total": job.images_total,
                "completedImages": completed,
            },
            "error": job.error,
            "metadata": {
                "mode": job.mode,
                "lane": job.lane,
                "group": job.group,
                "groupId": job.group_id,
                "batchId": job.batch_id,
                "numberOfVariations": job.images_total,
                "zipUrl": zip_url,
            },
            "startedAt": iso(job.started_at),
            "completedAt": iso(job.completed_at),
            "createdAt": iso(job.created_at),
            "updatedAt": iso(updated),
        },
        "generation": generation,
        "images": images,
        "nextCursor": indices.stop if indices.stop < job.images_total else None,
    }


async def _only_image(services: Services, job: JobRecord) -> ImageRecord | None:
    try:
        _, records = await services.store.records_page(job.id, 0, 1)
    except KeyError:
        raise NotFound(JOB_NOT_FOUND) from None
    record = records.get(0)
    return record if record is not None and record.status == ImageStatus.SUCCEEDED else None


async def _stream(
    storage: Storage, key: str, media_type: str, filename: str, size: int | None, missing: str
) -> StreamingResponse:
    """The object, read chunk by chunk in worker threads (the client is blocking) and sent as it
    comes: memory stays at one chunk whatever the object's size."""
    # A generator (typed as an Iterator): closed by _rest when the client goes away.
    chunks = cast(Generator[bytes], storage.iter_object(key))
    try:
        # Read before any header is sent: a missing object is then a 404, not a cut-off 200.
        first = await run_in_threadpool(next, chunks, None)
    except S3Error as exc:
        if exc.code in MISSING:
            raise NotFound(missing) from None
        raise
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Cache-Control": "private, max-age=0, no-store",
    }
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(_rest(first, chunks), media_type=media_type, headers=headers)


async def _rest(first: bytes | None, chunks: Generator[bytes]) -> AsyncIterator[bytes]:
    try:
        chunk = first
        while chunk is not None:
            yield chunk
            chunk = await run_in_threadpool(next, chunks, None)
    finally:
        # At the end, or when the client went away: a half-read object's connection is closed,
        # not handed back to the pool. No thread runs the generator now (the await above is over).
        chunks.close()
