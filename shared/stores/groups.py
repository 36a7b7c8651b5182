"""Groups in Redis: named sets of a project's jobs (keys.group, keys.group_jobs, keys.project_groups).

A group is created on its own (POST /api/groups) or by the first job that names it; the create
script resolves a job's group by name in the same call that stores the job (shared/lua/create.lua).
"""

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import WatchError

from shared import keys, scripts
from shared.errors import Conflict, MissingKeys, NotFound
from shared.ids import is_id
from shared.models import FINAL_STATUS_VALUES
from shared.scripts import Answer

NOT_FOUND = "No such group in this project."
DELETE_TRIES = 10
TOTALS_CHUNK = 1000  # jobs' counts read per Redis call when adding up the group's images


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class GroupSummary:
    group: Group
    job_count: int


class GroupStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def find(self, project: str, group_id: str) -> Group | None:
        """None if it does not exist, belongs to another project or is no id (it never reaches Redis)."""
        if not is_id(group_id):
            return None
        raw = await self.redis.hgetall(keys.group(group_id))
        if not raw or raw.get("project") != project:
            return None
        return Group(group_id, raw["name"], float(raw["created_at"]))

    async def get(self, project: str, group_id: str) -> Group:
        group = await self.find(project, group_id)
        if group is None:
            raise NotFound(NOT_FOUND)
        return group

    async def create(self, project: str, name: str) -> Group:
        """A new group; Conflict if the project has one of that name."""
        reply = await scripts.CREATE_GROUP(self.redis, [], [name, uuid.uuid4().hex, project, time.time()])
        group_id = str(reply.values[0])
        if reply.answer != Answer.DONE:
            raise Conflict(f"A group named {name!r} already exists: {group_id}.")
        return await self.get(project, group_id)

    async def resolve(self, project: str, name_or_id: str, *, required: Sequence[str] = ()) -> tuple[str, str]:
        """(group id, name) for what a job names: a group id of this project, else a group name
        (the group is created if it does not exist yet). With `required` (distinct keys), only if they
        all exist, checked in the same call: else MissingKeys with their indices, and nothing changes."""
        args = [name_or_id, project, uuid.uuid4().hex, time.time()]
        reply = await scripts.RESOLVE_GROUP(self.redis, list(required), args)
        if reply.answer == Answer.MISSING:
            raise MissingKeys([int(position) - 1 for position in reply.values[0]])
        return str(reply.values[0]), str(reply.values[1])

    async def summaries(self, project: str) -> list[GroupSummary]:
        group_ids = list((await self.redis.hgetall(keys.project_groups(project))).values())
        async with self.redis.pipeline(transaction=False) as pipe:
            for group_id in group_ids:
                pipe.hgetall(keys.group(group_id))
                pipe.zcard(keys.group_jobs(group_id))
            replies = await pipe.execute()
        summaries = [
            GroupSummary(Group(group_id, raw["name"], float(raw["created_at"])), count)
            for group_id, raw, count in zip(group_ids, replies[::2], replies[1::2], strict=True)
            if raw
        ]
        summaries.sort(key=lambda summary: summary.group.created_at)
        return summaries

    async def job_count(self, group_id: str) -> int:
        return int(await self.redis.zcard(keys.group_jobs(group_id)))

    async def job_ids(self, group_id: str) -> list[str]:
        """Every job of the group, oldest first (a download reads them all)."""
        return list(await self.redis.zrange(keys.group_jobs(group_id), 0, -1))

    async def position(self, group_id: str, job_id: str, score: float) -> tuple[int, bool]:
        """Where a page that starts at the job (created at `score`) starts in the group's job index,
        and whether the job is still there: its rank, or, if it left the group (retention), that of
        the first job created after it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrank(keys.group_jobs(group_id), job_id)
            pipe.zcount(keys.group_jobs(group_id), "-inf", f"({score!r}")
            rank, earlier = await pipe.execute()
        return (int(earlier), False) if rank is None else (int(rank), True)

    async def jobs_from(self, group_id: str, position: int, count: int) -> list[tuple[str, float]]:
        """(job id, creation time) of up to `count` jobs of the group from `position` on."""
        found = await self.redis.zrange(keys.group_jobs(group_id), position, position + count - 1, withscores=True)
        return [(str(job_id), float(score)) for job_id, score in found]

    async def images_succeeded(self, group_id: str) -> int:
        """The succeeded images of all the group's jobs, from their summaries: still a read per job,
        but no records, and a thousand jobs per Redis call (where a pipeline of HGETs costs the
        gateway an order of magnitude more per thousand)."""
        total, start = 0, 0
        while True:
            counts = await self.redis.sort_ro(
                keys.group_jobs(group_id),
                start=start,
                num=TOTALS_CHUNK,
                by="nosort",
                get=[f"{keys.job('*')}->images_succeeded"],
            )
            total += sum(int(count) for count in counts if count)
            if len(counts) < TOTALS_CHUNK:
                return total
            start += TOTALS_CHUNK

    async def delete(self, project: str, group_id: str) -> None:
        """Delete the group (its jobs stay, with their results); Conflict while a job is unfinished."""
        group = await self.get(project, group_id)
        for _ in range(DELETE_TRIES):
            try:
                await self._delete_if_finished(project, group)
                return
            except WatchError:
                continue  # a job joined the group meanwhile: look again
        raise Conflict("The group keeps changing; try again.")

    async def _delete_if_finished(self, project: str, group: Group) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            # Watching the job index makes a job submitted to the group meanwhile abort the delete.
            await pipe.watch(keys.group_jobs(group.id), keys.group(group.id))
            unfinished = await self._unfinished(await pipe.zrange(keys.group_jobs(group.id), 0, -1))
            if unfinished:
                raise Conflict(
                    f"The group has {len(unfinished)} unfinished job(s) ({', '.join(unfinished[:5])}); "
                    "cancel them or wait until they finish, then delete the group."
                )
            pipe.multi()
            pipe.delete(keys.group(group.id), keys.group_jobs(group.id))
            pipe.hdel(keys.project_groups(project), group.name)
            await pipe.execute()

    async def _unfinished(self, job_ids: list[str]) -> list[str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "status")
            statuses = await pipe.execute()
        return [
            job_id
            for job_id, value in zip(job_ids, statuses, strict=True)
            if value is not None and value not in FINAL_STATUS_VALUES
        ]
