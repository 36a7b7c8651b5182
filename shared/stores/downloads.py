"""Downloads of whole groups in Redis (keys.download): the gateway creates them, the packager builds them."""

import json
import time
import uuid
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, field_validator
from redis.asyncio import Redis

from shared import keys
from shared.errors import NotFound
from shared.ids import is_id


class DownloadStatus(StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


FINAL_DOWNLOAD_STATUSES = frozenset({DownloadStatus.READY, DownloadStatus.FAILED})


class DownloadRecord(BaseModel):
    """The hash keys.download(id)."""

    id: str
    project: str
    group_ids: list[str]
    status: DownloadStatus
    created_at: float
    completed_at: float | None = None
    image_count: int | None = None
    zip_key: str | None = None
    zip_bytes: int | None = None
    # A download of exactly one image links that image instead of zipping it.
    single_key: str | None = None
    single_name: str | None = None
    error: str | None = None
    attempts: int = 0

    @field_validator("group_ids", mode="before")
    @classmethod
    def _from_json(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value


NOT_FOUND = "No such download in this project."


class DownloadStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def create(self, project: str, group_ids: list[str]) -> DownloadRecord:
        """Record a queued download and publish it for the packager, all or nothing."""
        record = DownloadRecord(
            id=uuid.uuid4().hex,
            project=project,
            group_ids=group_ids,
            status=DownloadStatus.QUEUED,
            created_at=time.time(),
        )
        fields = {**record.model_dump(mode="json", exclude_none=True), "group_ids": json.dumps(group_ids)}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.download(record.id), mapping=fields)
            pipe.zadd(keys.DOWNLOADS_BY_TIME, {record.id: record.created_at})
            pipe.xadd(keys.DOWNLOADS_STREAM, {"download_id": record.id})
            await pipe.execute()
        return record

    async def find(self, download_id: str) -> DownloadRecord | None:
        if not is_id(download_id):
            return None
        raw = await self.redis.hgetall(keys.download(download_id))
        if not raw:
            return None
        return DownloadRecord.model_validate({k: v for k, v in raw.items() if v != ""})

    async def get(self, project: str, download_id: str) -> DownloadRecord:
        record = await self.find(download_id)
        if record is None or record.project != project:
            raise NotFound(NOT_FOUND)
        return record

    async def start_building(self, download_id: str) -> int:
        """Mark the download building; returns how many attempts (this one included) it has had."""
        key = keys.download(download_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "attempts", 1)
            pipe.hset(key, "status", DownloadStatus.BUILDING.value)
            attempts, _ = await pipe.execute()
        return int(attempts)

    async def finish(self, download_id: str, status: DownloadStatus, **fields: Any) -> None:
        values = {name: value for name, value in fields.items() if value is not None}
        await self.redis.hset(
            keys.download(download_id), mapping={"status": status.value, "completed_at": time.time(), **values}
        )
