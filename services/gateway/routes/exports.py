"""/api/exports: copy jobs' or groups' images to a bucket of the project's own, and follow the copy.

Destinations are the operator's (BUNCH_EXPORT_DESTINATIONS, shared/export_destinations.py): a
caller names one of its project's, never an endpoint. The packager does the copying
(services/packager/exports/).
"""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.exports import (
    ExportAccepted,
    ExportDestinations,
    ExportDestinationView,
    ExportList,
    ExportObjectError,
    ExportProgress,
    ExportRequest,
    ExportView,
)
from shared.errors import Invalid, NotFound
from shared.stores.exports import ExportLayout, ExportRecord, ExportStore
from shared.times import utc
from shared.webhook_safety import webhook_url_problem

router = APIRouter(prefix="/api/exports", tags=["exports"], responses=API_PROBLEMS, route_class=IdempotentRoute)

ERRORS_SHOWN = 100  # per-object errors in one view (the export keeps up to export_max_errors_kept)


@router.get("/destinations", response_model=ExportDestinations)
async def list_export_destinations(project: ProjectDep, services: ServicesDep) -> ExportDestinations:
    destinations = services.settings.export_destinations_of(project).values()
    return ExportDestinations(
        destinations=[
            ExportDestinationView(name=d.name, endpoint=d.endpoint, bucket=d.bucket, prefix=d.prefix)
            for d in sorted(destinations, key=lambda d: d.name)
        ]
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportAccepted,
    responses=problems(
        404,
        429,
        described={
            404: "The destination, a group or a job is not in this project",
            429: "The project has as many exports queued or running as it may",
        },
    ),
)
@idempotent
async def create_export(
    body: ExportRequest, project: ProjectDep, services: ServicesDep, response: Response
) -> ExportAccepted:
    if body.destination not in services.settings.export_destinations_of(project):
        raise NotFound(
            f"No such export destination in this project: {body.destination!r}. "
            "GET /api/exports/destinations lists the project's."
        )
    group_ids = list(dict.fromkeys(body.group_ids or []))
    job_ids = list(dict.fromkeys(body.job_ids or []))
    for group_id in group_ids:
        if await services.groups.find(project, group_id) is None:
            raise NotFound(f"No such group in this project: {group_id}.")
    if job_ids:
        owned = {job.id for job in await services.store.get_many(job_ids) if job.project == project}
        for job_id in job_ids:
            if job_id not in owned:
                raise NotFound(f"No such job in this project: {job_id}.")
    if body.webhook_url:
        settings = services.settings
        problem = await asyncio.to_thread(webhook_url_problem, body.webhook_url, settings.allow_private_webhooks)
        if problem:
            raise Invalid(f"webhook_url: {problem}")
    record = await services.exports.create(
        project,
        body.destination,
        job_ids=job_ids,
        group_ids=group_ids,
        layout=ExportLayout(body.layout),
        include_manifest=body.include_manifest,
        webhook_url=body.webhook_url,
    )
    response.headers["Location"] = f"/api/exports/{record.id}"
    return ExportAccepted(id=record.id, status=record.status)


@router.get("", response_model=ExportList)
async def list_exports(
    project: ProjectDep, services: ServicesDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> ExportList:
    records = await services.exports.newest(project, limit)
    return ExportList(exports=[await _view(record, services.exports) for record in records])


@router.get("/{export_id}", response_model=ExportView, responses=problems(404))
async def get_export(export_id: str, project: ProjectDep, services: ServicesDep) -> ExportView:
    return await _view(await services.exports.get(project, export_id), services.exports)


@router.post(
    "/{export_id}/cancel",
    response_model=ExportView,
    responses=problems(404, 409, described={409: "The export has ended already"}),
)
async def cancel_export(export_id: str, project: ProjectDep, services: ServicesDep) -> ExportView:
    return await _view(await services.exports.cancel(project, export_id), services.exports)


async def _view(record: ExportRecord, exports: ExportStore) -> ExportView:
    errors = await exports.errors(record.id, ERRORS_SHOWN) if record.objects_failed else []
    return ExportView(
        id=record.id,
        status=record.status,
        destination=record.destination,
        layout=record.layout,
        include_manifest=record.include_manifest,
        group_ids=record.group_ids,
        job_ids=record.job_ids,
        progress=ExportProgress.model_validate(record.progress()),
        errors=[ExportObjectError.model_validate(error.model_dump()) for error in errors],
        errors_truncated=record.objects_failed > len(errors),
        error=record.error,
        webhook_status=record.webhook_status,
        created_at=utc(record.created_at),
        started_at=utc(record.started_at),
        completed_at=utc(record.completed_at),
    )
