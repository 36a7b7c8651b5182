"""/api/groups: named sets of a project's jobs, with their results."""

import json
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.group_pages import (
    IMAGE_CURSOR,
    JOB_CURSOR,
    MAX_IMAGE_PAGE,
    MAX_JOB_PAGE,
    ImagePage,
    image_page,
    job_page,
)
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.groups import GroupCreate, GroupDetails, GroupList, GroupSummary, GroupView
from shared.times import iso, utc

router = APIRouter(prefix="/api/groups", tags=["groups"], responses=API_PROBLEMS, route_class=IdempotentRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=GroupView,
    responses=problems(409, described={409: "A group of that name exists in the project"}),
)
@idempotent
async def create_group(body: GroupCreate, project: ProjectDep, services: ServicesDep, response: Response) -> GroupView:
    group = await services.groups.create(project, body.name)
    response.headers["Location"] = f"/api/groups/{group.id}"
    return GroupView(id=group.id, name=group.name, created_at=utc(group.created_at))


@router.get("", response_model=GroupList)
async def list_groups(project: ProjectDep, services: ServicesDep) -> GroupList:
    return GroupList(
        groups=[
            GroupSummary(id=s.group.id, name=s.group.name, created_at=utc(s.group.created_at), job_count=s.job_count)
            for s in await services.groups.summaries(project)
        ]
    )


@router.get("/{group_id}", response_model=GroupDetails, responses=problems(404))
async def get_group(
    group_id: str,
    project: ProjectDep,
    services: ServicesDep,
    job_limit: Annotated[int, Query(ge=0, le=MAX_JOB_PAGE)] = 50,
    job_cursor: Annotated[str | None, Query(pattern=JOB_CURSOR)] = None,
    image_limit: Annotated[int, Query(ge=0, le=MAX_IMAGE_PAGE)] = 100,
    image_cursor: Annotated[str | None, Query(pattern=IMAGE_CURSOR)] = None,
) -> Response:
    """The group with a page of its jobs and a page of their images (`next_job_cursor` and
    `next_image_cursor` ask for the next ones): a page costs the same whatever the group holds."""
    groups, store = services.groups, services.store
    async with services.heavy_reads.slot(project):
        group = await groups.get(project, group_id)
        jobs, next_jobs = await job_page(groups, store, group_id, job_cursor, job_limit) if job_limit else ([], None)
        images = ImagePage([], {}, {}, None)
        if image_limit:
            images = await image_page(groups, store, services.storage, group_id, image_cursor, image_limit)
        details = {
            "id": group_id,
            "name": group.name,
            "created_at": iso(group.created_at),
            "job_count": await groups.job_count(group_id),
            "jobs": jobs,
            "next_job_cursor": next_jobs,
            "prompts": images.prompts,
            "reference_ids": images.reference_ids,
            "images": images.images,
            "images_total": await groups.images_succeeded(group_id),
            "next_image_cursor": images.next_cursor,
        }
    # Built as plain data and written once, as GET /api/jobs/{id}/results does: validating and
    # dumping hundreds of models per page would hold the event loop several times longer.
    return Response(json.dumps(details, separators=(",", ":")), media_type="application/json")


@router.delete(
    "/{group_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=problems(404, 409, described={409: "The group has unfinished jobs"}),
)
async def delete_group(group_id: str, project: ProjectDep, services: ServicesDep) -> Response:
    """Delete the group (its jobs stay, with their results) once none of its jobs is unfinished."""
    await services.groups.delete(project, group_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
