"""Groups: named sets of a project's jobs, with their results, and resolving the group a job names."""

import json
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import WatchError

from services.gateway.deps import ProjectDep, RedisDep, StorageDep, StoreDep
from services.gateway.group_views import (
    IMAGE_CURSOR,
    JOB_CURSOR,
    MAX_IMAGE_PAGE,
    MAX_JOB_PAGE,
    GroupImage,
    GroupJob,
    ImagePage,
    image_page,
    images_succeeded,
    iso,
    job_page,
)
from services.gateway.schemas import API_PROBLEMS, JsonRequest, problems
from shared import keys, scripts
from shared.ids import is_id
from shared.jobstore import MissingKeys
from shared.models import FINAL_JOB_STATUSES, GroupName
from shared.scripts import Answer

router = APIRouter(prefix="/api/groups", tags=["groups"], responses=API_PROBLEMS)

NOT_FOUND = "No such group in this project."


class GroupCreate(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    name: GroupName


class GroupView(BaseModel):
    id: str
    name: str
    created_at: datetime


class GroupSummary(GroupView):
    job_count: int


class GroupList(BaseModel):
    groups: list[GroupSummary]


class GroupDetails(GroupSummary):
    """The group, a page of its jobs and a page of their succeeded images; each list has its own
    cursor, and `job_limit=0` or `image_limit=0` leaves a list out (its cursor is then null)."""

    jobs: list[GroupJob]  # in the order they were submitted
    next_job_cursor: str | None  # pass as job_cursor for the next page; None on the last page
    # What the page's images of each job share, given once: by job id, the prompts they name (by
    # prompt index) and, for a semi-automatic job, the reference images every image was made from.
    prompts: dict[str, dict[int, str]]
    reference_ids: dict[str, list[str]]
    # The jobs' succeeded images, job by job, each job's in index order. A page looks at up to
    # MAX_SLOTS_EXAMINED image slots: it may hold fewer than image_limit images (none, even) and
    # still have a next page.
    images: list[GroupImage]
    images_total: int  # succeeded images over all the group's jobs
    next_image_cursor: str | None  # pass as image_cursor for the next page; None on the last page


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


async def load_group(redis: Redis, project: str, group_id: str) -> dict[str, str] | None:
    """The group's hash, or None if it does not exist, belongs to another project or is no id."""
    if not is_id(group_id):
        return None
    raw = await redis.hgetall(keys.group(group_id))
    return raw if raw and raw.get("project") == project else None


async def create_group(redis: Redis, project: str, name: str) -> tuple[str, str, bool]:
    """(group id, name, created): the project's group of that name, created if there is none."""
    group_id = uuid.uuid4().hex
    created, found_id = await scripts.CREATE_GROUP(redis, [], [name, group_id, project, time.time()])
    return str(found_id), name, created == Answer.DONE


async def resolve_group(
    redis: Redis, project: str, name_or_id: str, *, required: Sequence[str] = ()
) -> tuple[str, str]:
    """(group id, name) for what a job names: a group id of this project, else a group name
    (the group is created if it does not exist yet). With `required` (distinct keys), only if they
    all exist, checked in the same call: else MissingKeys with their indices, and nothing changes."""
    found = await scripts.RESOLVE_GROUP(redis, list(required), [name_or_id, project, uuid.uuid4().hex, time.time()])
    if found[0] == Answer.MISSING:
        raise MissingKeys([int(position) - 1 for position in found[1]])
    return str(found[1]), str(found[2])


def could_be_group_id(name_or_id: str) -> bool:
    """Whether a job's group may name a group by its id (a uuid4 hex) rather than by its name."""
    return is_id(name_or_id)


async def _group_or_404(redis: Redis, project: str, group_id: str) -> dict[str, str]:
    group = await load_group(redis, project, group_id)
    if group is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return group


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=GroupView,
    responses=problems(409, described={409: "A group of that name exists in the project"}),
)
async def create(body: GroupCreate, project: ProjectDep, redis: RedisDep) -> GroupView:
    group_id, name, created = await create_group(redis, project, body.name)
    if not created:
        raise HTTPException(status.HTTP_409_CONFLICT, f"A group named {name!r} already exists: {group_id}.")
    group = await _group_or_404(redis, project, group_id)
    return GroupView(id=group_id, name=name, created_at=_time(float(group["created_at"])))


@router.get("", response_model=GroupList)
async def list_groups(project: ProjectDep, redis: RedisDep) -> GroupList:
    group_ids = list((await redis.hgetall(keys.project_groups(project))).values())
    async with redis.pipeline(transaction=False) as pipe:
        for group_id in group_ids:
            pipe.hgetall(keys.group(group_id))
            pipe.zcard(keys.group_jobs(group_id))
        replies = await pipe.execute()
    groups = [
        GroupSummary(id=group_id, name=raw["name"], created_at=_time(float(raw["created_at"])), job_count=count)
        for group_id, raw, count in zip(group_ids, replies[::2], replies[1::2], strict=True)
        if raw
    ]
    groups.sort(key=lambda group: group.created_at)
    return GroupList(groups=groups)


@router.get("/{group_id}", response_model=GroupDetails, responses=problems(404))
async def group_details(
    group_id: str,
    request: Request,
    project: ProjectDep,
    redis: RedisDep,
    store: StoreDep,
    storage: StorageDep,
    job_limit: Annotated[int, Query(ge=0, le=MAX_JOB_PAGE)] = 50,
    job_cursor: Annotated[str | None, Query(pattern=JOB_CURSOR)] = None,
    image_limit: Annotated[int, Query(ge=0, le=MAX_IMAGE_PAGE)] = 100,
    image_cursor: Annotated[str | None, Query(pattern=IMAGE_CURSOR)] = None,
) -> Response:
    """The group with a page of its jobs and a page of their images (`next_job_cursor` and
    `next_image_cursor` ask for the next ones): a page costs the same whatever the group holds."""
    async with request.app.state.heavy_reads.slot(project):
        group = await _group_or_404(redis, project, group_id)
        jobs, next_jobs = await job_page(redis, store, group_id, job_cursor, job_limit) if job_limit else ([], None)
        images = (
            await image_page(redis, store, storage, group_id, image_cursor, image_limit)
            if image_limit
            else ImagePage([], {}, {}, None)
        )
        details = {
            "id": group_id,
            "name": group["name"],
            "created_at": iso(float(group["created_at"])),
            "job_count": await redis.zcard(keys.group_jobs(group_id)),
            "jobs": jobs,
            "next_job_cursor": next_jobs,
            "prompts": images.prompts,
            "reference_ids": images.reference_ids,
            "images": images.images,
            "images_total": await images_succeeded(redis, group_id),
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
async def delete_group(group_id: str, project: ProjectDep, redis: RedisDep) -> Response:
    """Delete the group (its jobs stay, with their results) once none of its jobs is unfinished."""
    group = await _group_or_404(redis, project, group_id)
    for _ in range(10):
        try:
            await _delete_if_finished(redis, project, group_id, group["name"])
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        except WatchError:
            continue  # a job joined the group meanwhile: look again
    raise HTTPException(status.HTTP_409_CONFLICT, "The group keeps changing; try again.")


async def _delete_if_finished(redis: Redis, project: str, group_id: str, name: str) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        # Watching the job index makes a job submitted to the group meanwhile abort the delete.
        await pipe.watch(keys.group_jobs(group_id), keys.group(group_id))
        job_ids = await pipe.zrange(keys.group_jobs(group_id), 0, -1)
        unfinished = await _unfinished(redis, job_ids)
        if unfinished:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"The group has {len(unfinished)} unfinished job(s) ({', '.join(unfinished[:5])}); "
                "cancel them or wait until they finish, then delete the group.",
            )
        pipe.multi()
        pipe.delete(keys.group(group_id), keys.group_jobs(group_id))
        pipe.hdel(keys.project_groups(project), name)
        await pipe.execute()


async def _unfinished(redis: Redis, job_ids: list[str]) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "status")
        statuses = await pipe.execute()
    final = {s.value for s in FINAL_JOB_STATUSES}
    return [job_id for job_id, value in zip(job_ids, statuses, strict=True) if value is not None and value not in final]
