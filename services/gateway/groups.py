"""Groups: named sets of a project's jobs, with their results, and resolving the group a job names."""

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import WatchError

from services.gateway.deps import ProjectDep, RedisDep, StorageDep, StoreDep
from services.gateway.schemas import API_PROBLEMS, JsonRequest, Progress, problems
from shared import keys, planning, scripts
from shared.jobstore import ImageRecord, JobRecord, JobStore, MissingKeys
from shared.models import FINAL_JOB_STATUSES, GroupName, ImageStatus, JobStatus
from shared.planning import image_file_name
from shared.scripts import Answer
from shared.storage import Storage

router = APIRouter(prefix="/api/groups", tags=["groups"], responses=API_PROBLEMS)

NOT_FOUND = "No such group in this project."
GROUP_ID = re.compile(r"[0-9a-f]{32}")  # uuid.uuid4().hex


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


class GroupJob(BaseModel):
    id: str
    status: JobStatus
    mode: str
    priority: int
    progress: Progress
    created_at: datetime
    completed_at: datetime | None


class GroupImage(BaseModel):
    job_id: str
    index: int
    url: str
    prompt: str
    reference_ids: list[str]
    input_id: str | None
    created_at: datetime


class GroupDetails(GroupSummary):
    jobs: list[GroupJob]
    images: list[GroupImage]
    images_total: int  # succeeded images over all the group's jobs
    next_image_offset: int | None  # pass as image_offset for the next page; None on the last page


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


async def load_group(redis: Redis, project: str, group_id: str) -> dict[str, str] | None:
    """The group's hash, or None if it does not exist or belongs to another project."""
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
    return GROUP_ID.fullmatch(name_or_id) is not None


async def _group_or_404(redis: Redis, project: str, group_id: str) -> dict[str, str]:
    group = await load_group(redis, project, group_id)
    if group is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return group


async def _jobs(store: JobStore, job_ids: list[str]) -> list[JobRecord]:
    records = [await store.get(job_id) for job_id in job_ids]
    return [job for job in records if job is not None]  # a job purged by retention meanwhile


def _job_view(job: JobRecord) -> GroupJob:
    return GroupJob(
        id=job.id,
        status=job.status,
        mode=job.mode,
        priority=job.priority,
        progress=Progress(
            images_total=job.images_total,
            images_succeeded=job.images_succeeded,
            images_failed=job.images_failed,
            runs_total=job.runs_total,
            runs_done=job.runs_done,
        ),
        created_at=_time(job.created_at),
        completed_at=None if job.completed_at is None else _time(job.completed_at),
    )


@dataclass(frozen=True, slots=True)
class _Succeeded:
    job_id: str
    index: int
    record: ImageRecord
    slot: planning.Slot


async def _succeeded_images(store: JobStore, job_id: str) -> list[_Succeeded]:
    try:
        config, records = await store.records(job_id)
    except KeyError:
        return []  # purged by retention meanwhile
    return [
        _Succeeded(job_id, index, records[index], planning.slot(config, index))
        for index in sorted(records)
        if records[index].status == ImageStatus.SUCCEEDED and records[index].object_key
    ]


def _image_view(image: _Succeeded, storage: Storage) -> GroupImage:
    record = image.record
    assert record.object_key is not None
    return GroupImage(
        job_id=image.job_id,
        index=image.index,
        url=storage.presigned_get(
            record.object_key, f"{image.job_id}-{image_file_name(image.index, record.mime_type)}"
        ),
        prompt=image.slot.prompt,
        reference_ids=list(image.slot.reference_ids),
        input_id=image.slot.input_id,
        created_at=_time(record.finished_at),
    )


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
    project: ProjectDep,
    redis: RedisDep,
    store: StoreDep,
    storage: StorageDep,
    image_offset: Annotated[int, Query(ge=0)] = 0,
    image_limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> GroupDetails:
    group = await _group_or_404(redis, project, group_id)
    jobs = await _jobs(store, await redis.zrange(keys.group_jobs(group_id), 0, -1))
    images: list[_Succeeded] = []
    for job in jobs:
        images += await _succeeded_images(store, job.id)
    page = images[image_offset : image_offset + image_limit]
    following = image_offset + len(page)
    return GroupDetails(
        id=group_id,
        name=group["name"],
        created_at=_time(float(group["created_at"])),
        job_count=len(jobs),
        jobs=[_job_view(job) for job in jobs],
        images=[_image_view(image, storage) for image in page],  # signed anew on every read
        images_total=len(images),
        next_image_offset=following if following < len(images) else None,
    )


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
