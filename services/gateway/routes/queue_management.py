"""The routes only the queue management API's document style has (docs/compatible_api.md):
enqueue saved batches, a job's status, redo cells of a batch. Its retry, cancel, stats and metrics
are the native routes of /api/queue, which answer both styles (services/gateway/routes/queue.py)."""

from typing import Annotated

from fastapi import APIRouter, Body

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.document_style import DocumentRoute, check_project
from services.gateway.idempotency import idempotent
from services.gateway.queue_documents import document_job, enqueue, redo_row
from services.gateway.schemas.common import DOCUMENT_API_PROBLEMS, document_problems
from services.gateway.schemas.queue_documents import (
    Enqueued,
    EnqueueRequest,
    QueueJobAnswer,
    RedoDocument,
    Redone,
)

router = APIRouter(
    prefix="/api/queue",
    tags=["queue-management"],
    responses=DOCUMENT_API_PROBLEMS,
    route_class=DocumentRoute,
)


@router.post("/enqueue", response_model=Enqueued, responses=document_problems(402, 404))
@idempotent
async def enqueue_batches(
    body: Annotated[EnqueueRequest, Body()], project: ProjectDep, services: ServicesDep
) -> Enqueued:
    """A job per saved batch (POST /api/batches); a batch's queued or running jobs are canceled first."""
    check_project(body.project_id, project)
    job_ids, canceled = await enqueue(services, project, body.all_batch_ids(), body.priority)
    return Enqueued(
        job_id=job_ids[0],
        job_ids=job_ids,
        canceled_count=canceled,
        message=f"Enqueued {len(job_ids)} batch job(s); canceled {canceled} earlier job(s).",
    )


@router.get("/status/{job_id}", response_model=QueueJobAnswer, responses=document_problems(404))
async def get_queue_job_status(job_id: str, project: ProjectDep, services: ServicesDep) -> QueueJobAnswer:
    return QueueJobAnswer(job=await document_job(services, project, job_id))


@router.post("/redo", response_model=Redone, responses=document_problems(402, 404, 409))
@idempotent
async def redo_cells(body: Annotated[RedoDocument, Body()], project: ProjectDep, services: ServicesDep) -> Redone:
    """Those columns of that row of the batch's latest job made again (services/gateway/queue_documents.redo_row)."""
    check_project(body.project_id, project)
    batch = await services.saved_batches.find(project, body.batch_id)
    replacements = {**(body.source_image_ids or {}), **body.cropped_image_ids}
    job_ids = await redo_row(
        services, project, batch, body.row_index, body.redo_column_ids, replacements, body.priority
    )
    return Redone(
        job_id=job_ids[0],
        job_ids=job_ids,
        message=f"Redoing {len(body.redo_column_ids)} image(s) of row {body.row_index}.",
    )
