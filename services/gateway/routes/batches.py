"""/api/batches: saved batches, job definitions stored without queueing anything and queued (again)
later, each time as a new job of their own."""

from typing import Annotated

from fastapi import APIRouter, Body, Query, Response, status
from pydantic import TypeAdapter

from services.gateway.deps import ProjectDep, Services, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.job_views import status_view
from services.gateway.schemas.batches import (
    BatchRequest,
    QueueFromBatch,
    SavedBatchList,
    SavedBatchSummary,
    SavedBatchView,
)
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.jobs import JobAccepted
from services.gateway.submissions import check, located, submit
from shared.errors import Conflict, NotFound
from shared.models import JobRequest
from shared.stores.saved_batches import SAVED_BATCH_NOT_FOUND, SavedBatch, column_id, shape_of
from shared.times import utc

router = APIRouter(prefix="/api/batches", tags=["batches"], responses=API_PROBLEMS, route_class=IdempotentRoute)

_job_config: TypeAdapter[JobRequest] = TypeAdapter(JobRequest)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SavedBatchView, responses=problems(409))
@idempotent
async def save_batch(
    body: Annotated[BatchRequest, Body()], project: ProjectDep, services: ServicesDep, response: Response
) -> SavedBatchView:
    """Checked as POST /api/jobs checks a job (its uploads, limits, lane), stored, queued never:
    POST /api/batches/{id}/jobs queues it."""
    config = _job_config.validate_python(body.model_dump(exclude={"name"}))
    checked = await check(services, project, config)
    rows, columns = shape_of(checked.config)  # a dataset's inputs filled in
    batch = await services.saved_batches.save(project, config, body.name, rows, columns)
    response.headers["Location"] = f"/api/batches/{batch.id}"
    return await _view(services, batch)


@router.get("", response_model=SavedBatchList)
async def list_batches(
    project: ProjectDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^\d+(\.\d+)?$")] = None,
) -> SavedBatchList:
    """Newest first; `cursor` is the `next_cursor` of the previous page."""
    batches = await services.saved_batches.page(project, float(cursor) if cursor else None, limit)
    summaries = [await _summary(services, batch) for batch in batches]
    next_cursor = repr(batches[-1].created_at) if len(batches) == limit else None
    return SavedBatchList(batches=summaries, next_cursor=next_cursor)


@router.get("/{batch_id}", response_model=SavedBatchView, responses=problems(404))
async def get_batch(batch_id: str, project: ProjectDep, services: ServicesDep) -> SavedBatchView:
    return await _view(services, await services.saved_batches.find(project, batch_id))


@router.delete(
    "/{batch_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problems(404, 409, described={409: "A job queued from it is unfinished"}),
)
async def delete_batch(batch_id: str, project: ProjectDep, services: ServicesDep) -> Response:
    """The definition only: the jobs queued from it stay, with their images and ZIPs."""
    deleted, unfinished = await services.saved_batches.delete(project, batch_id)
    if unfinished:
        raise Conflict(
            f"Jobs queued from this batch are unfinished: {', '.join(unfinished[:10])}. "
            "Cancel them or wait for them to finish first."
        )
    if not deleted:
        raise NotFound(SAVED_BATCH_NOT_FOUND)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{batch_id}/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=problems(402, 404)
)
@idempotent
async def queue_batch(
    batch_id: str,
    project: ProjectDep,
    services: ServicesDep,
    response: Response,
    body: Annotated[QueueFromBatch | None, Body()] = None,
) -> JobAccepted:
    """A new job from the batch's definition, checked and queued as POST /api/jobs would."""
    batch = await services.saved_batches.find(project, batch_id)
    config = (
        batch.config
        if body is None or body.priority is None
        else batch.config.model_copy(update={"priority": body.priority})
    )
    return located(response, await submit(services, project, config, batch_id=batch.id))


async def _summary(services: Services, batch: SavedBatch) -> SavedBatchSummary:
    return SavedBatchSummary(
        id=batch.id,
        name=batch.name,
        mode=batch.config.mode,
        lane=batch.config.lane,
        rows=batch.rows,
        columns=[column_id(n) for n in range(batch.columns)],
        images=batch.images,
        created_at=utc(batch.created_at),
        latest_job_id=await services.saved_batches.latest_job_id(batch.id),
    )


async def _view(services: Services, batch: SavedBatch) -> SavedBatchView:
    summary = await _summary(services, batch)
    jobs = await services.store.get_many(await services.saved_batches.job_ids(batch.id))
    views = [await status_view(job, services.store, services.storage, live=False) for job in jobs]
    return SavedBatchView(**summary.model_dump(), config=batch.config.model_dump(mode="json"), jobs=views)
