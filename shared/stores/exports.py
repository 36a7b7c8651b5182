"""Exports of images to a project's own bucket, in Redis (keys.export): the gateway creates and
cancels them, the packager (services/packager/exports/) copies and settles their objects."""

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, field_validator
from redis.asyncio import Redis

from shared import keys, scripts
from shared.errors import Conflict, NotFound, OverQuota
from shared.ids import is_id
from shared.scripts import Answer


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_EXPORT_STATUSES = frozenset({ExportStatus.COMPLETED, ExportStatus.FAILED, ExportStatus.CANCELED})


class ExportLayout(StrEnum):
    BY_GROUP = "by_group"  # <prefix>/<group>/<job_id>/<index>.<ext>
    FLAT = "flat"  # <prefix>/<job_id>-<index>.<ext>


class Outcome(StrEnum):
    """What became of one object of an export."""

    COPIED = "copied"
    SKIPPED = "skipped"  # already at the destination with the same size and checksum
    FAILED = "failed"


class ExportRecord(BaseModel):
    """The hash keys.export(id)."""

    id: str
    project: str
    destination: str
    layout: ExportLayout
    include_manifest: bool
    job_ids: list[str] = []
    group_ids: list[str] = []
    webhook_url: str | None = None
    status: ExportStatus
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    # Unknown until a packager has counted the objects (images, and a manifest per job).
    objects_total: int | None = None
    objects_copied: int = 0
    objects_skipped: int = 0
    objects_failed: int = 0
    bytes_copied: int = 0
    error: str | None = None
    attempts: int = 0
    webhook_status: str | None = None
    webhook_error: str | None = None

    @field_validator("job_ids", "group_ids", mode="before")
    @classmethod
    def _from_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @property
    def objects_done(self) -> int:
        return self.objects_copied + self.objects_skipped + self.objects_failed

    def progress(self) -> dict[str, int | None]:
        """The counts as the API, the events and the webhook show them."""
        return {
            "objects_total": self.objects_total,
            "objects_done": self.objects_done,
            "objects_copied": self.objects_copied,
            "objects_skipped": self.objects_skipped,
            "objects_failed": self.objects_failed,
            "bytes_copied": self.bytes_copied,
        }


class ObjectError(BaseModel):
    """Why one object of an export failed."""

    object: str  # its key at the destination
    job_id: str
    index: int | None  # None: the job's manifest
    reason: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """What became of one object of an export, to be counted (ExportStore.settle)."""

    member: str  # "<job_id>:<index>" or "<job_id>:manifest"
    outcome: Outcome
    copied_bytes: int = 0
    error: ObjectError | None = None


NOT_FOUND = "No such export in this project."
LIST_LIMIT = 200


class ExportStore:
    def __init__(self, redis: Redis, max_errors_kept: int = 1000, max_active: int = 2) -> None:
        self.redis = redis
        self.max_errors_kept = max_errors_kept
        self.max_active = max_active

    async def create(
        self,
        project: str,
        destination: str,
        *,
        job_ids: list[str],
        group_ids: list[str],
        layout: ExportLayout,
        include_manifest: bool,
        webhook_url: str | None,
    ) -> ExportRecord:
        """Record a queued export and publish it for the packager, all or nothing; OverQuota when the
        project has `max_active` exports queued or running already."""
        record = ExportRecord(
            id=uuid.uuid4().hex,
            project=project,
            destination=destination,
            layout=layout,
            include_manifest=include_manifest,
            job_ids=job_ids,
            group_ids=group_ids,
            webhook_url=webhook_url,
            status=ExportStatus.QUEUED,
            created_at=time.time(),
        )
        fields = {
            **record.model_dump(mode="json", exclude_none=True),
            "job_ids": json.dumps(job_ids),
            "group_ids": json.dumps(group_ids),
            "include_manifest": int(include_manifest),
        }
        reply = await scripts.CREATE_EXPORT(
            self.redis,
            [keys.export(record.id), keys.project_exports(project), keys.project_active_exports(project)],
            [record.id, record.created_at, self.max_active, *(item for pair in fields.items() for item in pair)],
        )
        if reply.answer == Answer.OVER_QUOTA:
            raise OverQuota(
                f"The project has {reply.values[0]} exports queued or running, as many as it may "
                f"(settings.export_max_active_per_project); start this one when one has ended.",
                retry_after=30,
            )
        return record

    async def find(self, export_id: str) -> ExportRecord | None:
        if not is_id(export_id):
            return None
        raw = await self.redis.hgetall(keys.export(export_id))
        if not raw:
            return None
        return ExportRecord.model_validate({k: v for k, v in raw.items() if v != ""})

    async def get(self, project: str, export_id: str) -> ExportRecord:
        record = await self.find(export_id)
        if record is None or record.project != project:
            raise NotFound(NOT_FOUND)
        return record

    async def newest(self, project: str, limit: int) -> list[ExportRecord]:
        """The project's newest exports, newest first: one ZREVRANGE and one HGETALL each."""
        export_ids = await self.redis.zrevrange(keys.project_exports(project), 0, min(limit, LIST_LIMIT) - 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for export_id in export_ids:
                pipe.hgetall(keys.export(export_id))
            hashes = await pipe.execute()
        return [ExportRecord.model_validate({k: v for k, v in raw.items() if v != ""}) for raw in hashes if raw]

    async def errors(self, export_id: str, limit: int) -> list[ObjectError]:
        raw = await self.redis.lrange(keys.export_errors(export_id), 0, limit - 1)
        return [ObjectError.model_validate_json(item) for item in raw]

    async def cancel(self, project: str, export_id: str) -> ExportRecord:
        """Cancel a queued or running export: its packager stops at the next object."""
        record = await self.get(project, export_id)
        reply = await self.finish(export_id, ExportStatus.CANCELED)
        if reply.answer == Answer.REFUSED:
            raise Conflict(f"The export has ended already ({reply.values[0]}).")
        return await self.get(project, export_id) if reply.done else record

    # --- the packager's side ---

    async def start(self, export_id: str, objects_total: int) -> scripts.Reply:
        """{DONE, attempts} | {REFUSED, status} | {MISSING}: scripts/start_export.lua."""
        return await scripts.START_EXPORT(self.redis, [keys.export(export_id)], [export_id, time.time(), objects_total])

    async def forgive_attempt(self, export_id: str) -> None:
        """Take back the attempt `start` counted: the delivery stopped for a shutdown, not a crash."""
        if await self.redis.exists(keys.export(export_id)):  # not a hash of its own if purged meanwhile
            await self.redis.hincrby(keys.export(export_id), "attempts", -1)

    async def settled(self, export_id: str, members: list[str]) -> set[str]:
        """Which of `members` ("<job_id>:<index>") the export has settled already."""
        if not members:
            return set()
        flags = await self.redis.smismember(keys.export_done(export_id), members)
        return {member for member, flag in zip(members, flags, strict=True) if flag}

    async def settle(self, export_id: str, settlements: Sequence[Settlement]) -> scripts.Reply:
        """{DONE, status, counted...} a flag per settlement (0: settled before) | {REFUSED, status}
        the export has ended | {MISSING}: scripts/settle_export_objects.lua."""
        args: list[str | int] = [self.max_errors_kept]
        for item in settlements:
            error = item.error.model_dump_json() if item.error else ""
            args += [item.member, item.outcome.value, item.copied_bytes, error]
        return await scripts.SETTLE_EXPORT_OBJECTS(
            self.redis, [keys.export(export_id), keys.export_done(export_id), keys.export_errors(export_id)], args
        )

    async def status(self, export_id: str) -> ExportStatus | None:
        value = await self.redis.hget(keys.export(export_id), "status")
        return ExportStatus(value) if value else None

    async def finish(
        self, export_id: str, status: ExportStatus, error: str | None = None, objects_total: int | None = None
    ) -> scripts.Reply:
        """{DONE} | {REFUSED, status} | {MISSING}: scripts/finish_export.lua."""
        return await scripts.FINISH_EXPORT(
            self.redis,
            [keys.export(export_id), keys.export_done(export_id)],
            [export_id, status.value, time.time(), error or "", "" if objects_total is None else objects_total],
        )
