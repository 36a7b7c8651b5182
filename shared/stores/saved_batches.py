"""Saved batches in Redis: a job's definition kept under an id, queued (again) later.

A batch's *rows* are its inputs in order (automatic: one per input image; semi-automatic: one per
prompt) and its *columns* the images each row makes (`v0`, `v1`, …: variations, or images per
prompt), so image `row * columns + column` of any job queued from it is that cell. The jobs queued
from a batch are listed in the same script call that stores each one (shared/lua/create.lua).
"""

import json
import time
import uuid
from dataclasses import dataclass

from pydantic import TypeAdapter
from redis.asyncio import Redis

from shared import keys, scripts
from shared.errors import Conflict, NotFound
from shared.ids import is_id
from shared.models import JobRequest, SemiAutoJobRequest
from shared.planning import JobConfig
from shared.scripts import Answer

SAVED_BATCH_NOT_FOUND = "No such batch in this project."

_config_adapter: TypeAdapter[JobConfig] = TypeAdapter(JobRequest)


def column_id(column: int) -> str:
    return f"v{column}"


def column_index(column: str, columns: int) -> int | None:
    """The index of a column id (`v3` → 3), None if it is not one of `columns` columns."""
    if not column.startswith("v") or not column[1:].isdigit() or (len(column) > 2 and column[1] == "0"):
        return None
    index = int(column[1:])
    return index if index < columns else None


def shape_of(config: JobConfig) -> tuple[int, int]:
    """(rows, columns) of a definition (a dataset's inputs filled in)."""
    if isinstance(config, SemiAutoJobRequest):
        return len(config.prompts), config.images_per_prompt
    return len(config.input_ids), config.variations_per_image


@dataclass(frozen=True, slots=True)
class SavedBatch:
    id: str
    project: str
    name: str | None
    config: JobConfig
    rows: int
    columns: int
    created_at: float

    @property
    def images(self) -> int:
        return self.rows * self.columns

    def image_index(self, row: int, column: int) -> int:
        return row * self.columns + column


class SavedBatchStore:
    def __init__(self, redis: Redis, max_per_project: int) -> None:
        self.redis = redis
        self.max_per_project = max_per_project

    async def save(self, project: str, config: JobConfig, name: str | None, rows: int, columns: int) -> SavedBatch:
        """Conflict when the project keeps as many batches as it may (nothing stored)."""
        batch = SavedBatch(uuid.uuid4().hex, project, name, config, rows, columns, time.time())
        fields = {
            "id": batch.id,
            "project": project,
            "name": name or "",
            "config": config.model_dump_json(),
            "rows": str(rows),
            "columns": str(columns),
            "created_at": repr(batch.created_at),
        }
        args = [batch.id, project, batch.created_at, self.max_per_project, json.dumps(fields, ensure_ascii=False)]
        saved = await scripts.SAVE_BATCH(self.redis, [], args)
        if saved.answer == Answer.OVER_QUOTA:
            raise Conflict(
                f"This project keeps {saved.values[0]} saved batches, the most it may "
                f"(BUNCH_PROJECT_MAX_SAVED_BATCHES is {self.max_per_project}); delete some first."
            )
        return batch

    async def get(self, project: str, batch_id: str) -> SavedBatch | None:
        """The batch if it is the project's; None for any other id, malformed ones included."""
        if not is_id(batch_id):
            return None
        raw = await self.redis.hgetall(keys.saved_batch(batch_id))
        if raw.get("project") != project:
            return None
        return SavedBatch(
            id=batch_id,
            project=project,
            name=raw["name"] or None,
            config=_config_adapter.validate_json(raw["config"]),
            rows=int(raw["rows"]),
            columns=int(raw["columns"]),
            created_at=float(raw["created_at"]),
        )

    async def find(self, project: str, batch_id: str) -> SavedBatch:
        """The project's batch; NotFound for any other id."""
        batch = await self.get(project, batch_id)
        if batch is None:
            raise NotFound(SAVED_BATCH_NOT_FOUND)
        return batch

    async def page(self, project: str, before: float | None, limit: int) -> list[SavedBatch]:
        """Up to `limit` of the project's batches, newest first, saved before `before`."""
        upper = "+inf" if before is None else f"({before!r}"
        ids = await self.redis.zrevrangebyscore(keys.project_saved_batches(project), upper, "-inf", start=0, num=limit)
        found = [await self.get(project, batch_id) for batch_id in ids]
        return [batch for batch in found if batch is not None]

    async def job_ids(self, batch_id: str, limit: int = 100) -> list[str]:
        """The jobs queued from the batch, newest first (at most the newest SAVED_BATCH_JOBS_KEPT)."""
        return list(await self.redis.zrevrange(keys.saved_batch_jobs(batch_id), 0, limit - 1))

    async def latest_job_id(self, batch_id: str) -> str | None:
        newest = await self.job_ids(batch_id, 1)
        return newest[0] if newest else None

    async def delete(self, project: str, batch_id: str) -> tuple[bool, list[str]]:
        """(True, []) once deleted; (False, []) if there is no such batch in the project; (False,
        unfinished job ids) while jobs queued from it are unfinished."""
        if not is_id(batch_id):
            return False, []
        deleted = await scripts.DELETE_SAVED_BATCH(self.redis, [], [batch_id, project])
        if deleted.answer == Answer.REFUSED:
            return False, [str(job_id) for job_id in deleted.values[0]]
        return deleted.done, []
