"""Jobs in Redis: creating them, their status and priority, canceling and redoing them, moving
their records to and from the archive, reading their image outcomes, and the figures status views
show. Also the operator's switches on scheduling (pause, weights). Runs are shared/stores/runs.py's."""

import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter
from redis.asyncio import Redis

from shared import keys, planning, scripts
from shared.archive import ArchivedRecords, JobArchive
from shared.errors import Invalid, MissingKeys, OverQuota
from shared.ids import is_id
from shared.models import FINAL_JOB_STATUSES, JobRequest, JobStatus
from shared.planning import JobConfig
from shared.redis_memory import MemoryGuard
from shared.scripts import Answer
from shared.settings import Settings
from shared.stores.records import (
    JOB_FIELDS,
    NO_FIGURES,
    PRIORITY_SCALE,
    ImageRecord,
    JobRecord,
    QueueFigures,
    job_record,
    present,
)

# Jobs a saved batch lists (its newest): enough for any history a front-end shows of one batch,
# and the list never grows with the times the batch is queued again.
SAVED_BATCH_JOBS_KEPT = 100

_config_adapter: TypeAdapter[JobConfig] = TypeAdapter(JobRequest)


class JobStore:
    """`archive` (object storage) holds finished jobs' config and image records once they left
    Redis; without it (the dispatcher's, the tests'), an archived job's records read as gone."""

    def __init__(self, redis: Redis, settings: Settings, archive: JobArchive | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.archive = archive
        self.memory = MemoryGuard(redis, settings.redis_memory_refuse_fraction)
        self._status = scripts.queue_figures(JOB_FIELDS)

    async def create(
        self,
        project: str,
        config: JobConfig,
        *,
        group_id: str | None = None,
        group_name: str | None = None,
        retry_of: str | None = None,
        required: Sequence[str] = (),
        dataset_id: str | None = None,
        batch_id: str | None = None,
    ) -> JobRecord:
        """Store a queued job and publish it for the dispatcher, all or nothing, in one script call.

        The job goes in group `group_id`, or in the project's group named `group_name` (created if
        there is none); `dataset_id` names the dataset its inputs come from, `batch_id` the saved
        batch it is queued from (listed among the batch's jobs in the same call; its key must be
        the last of `required`). With `required` (distinct keys: its uploads), only if they all exist: else
        MissingKeys with their indices, and nothing is written. Over an operator quota: OverQuota
        (Invalid for a job larger than the quota itself); Redis short of memory: Unavailable."""
        record = JobRecord(
            id=uuid.uuid4().hex,
            project=project,
            mode=config.mode,
            lane=config.lane,
            group=config.group,
            priority=config.priority,
            status=JobStatus.QUEUED,
            images_total=planning.images_total(config),
            runs_total=planning.runs_total(config, self.settings.run_size_for(config.lane)),
            created_at=time.time(),
            retry_of=retry_of,
            webhook_url=config.webhook_url,
            batch_id=batch_id,
        )
        max_live_images = self.settings.project_max_queued_images
        if max_live_images and record.images_total > max_live_images:
            raise Invalid(
                f"The job asks for {record.images_total} images; this project may have at most "
                f"{max_live_images} images queued or running at once. Split it into smaller jobs."
            )
        await self.memory.check()
        fields = present(record.model_dump(mode="json", exclude={"seq", "group_id"}))
        fields["config"] = config.model_dump_json()
        if config.lane == "batch":
            # The batch lane's claim sizes each batch from it (shared/lua/claim_batch_runs.lua).
            fields["per_prompt"] = planning.images_per_prompt(config)
        args: list[Any] = [record.id, project, record.created_at, record.priority, PRIORITY_SCALE]
        # Strings, so Redis stores each value exactly as redis-py would have written it; raw UTF-8,
        # so text reaches Redis as the encoder would have sent it.
        values = json.dumps({name: str(value) for name, value in fields.items()}, ensure_ascii=False)
        args += [group_id or "", retry_of or "", values, group_name or "", uuid.uuid4().hex]
        args += [record.images_total, max_live_images, self.settings.project_max_jobs_per_minute, dataset_id or ""]
        args += [config.lane, batch_id or "", SAVED_BATCH_JOBS_KEPT]
        created = await scripts.CREATE(self.redis, list(required), args)
        if created.answer == Answer.MISSING:
            raise MissingKeys([int(position) - 1 for position in created.values[0]])
        if created.answer == Answer.OVER_QUOTA:
            raise self._over_quota(created.values, record.images_total)
        seq, found_group = created.values
        record.seq = int(seq)
        record.group_id = str(found_group) or None
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        # Named fields only: the config of a 10,000-input job stays out of status reads.
        return job_record(await self.redis.hmget(keys.job(job_id), JOB_FIELDS))

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), JOB_FIELDS)
            rows = await pipe.execute()
        return [job for job in map(job_record, rows) if job is not None]

    async def get_for_project(self, project: str, job_id: str) -> JobRecord | None:
        """The job if it is the project's; None for any other id, malformed ones included."""
        if not is_id(job_id):
            return None
        job = await self.get(job_id)
        return job if job is not None and job.project == project else None

    async def config(self, job_id: str) -> JobConfig:
        raw, archived = await self.redis.hmget(keys.job(job_id), "config", "archived")
        if archived and self.archive is not None:
            raw = (await self.archive.read(job_id)).config
        if raw is None:
            raise KeyError(job_id)
        return _config_adapter.validate_json(raw)

    def _over_quota(self, refusal: Sequence[Any], images: int) -> OverQuota:
        """OverQuota from what an OVER_QUOTA reply carries: the quota, seconds to retry after, and
        for the images quota the project's images now."""
        kind, retry_after = str(refusal[0]), int(refusal[1])
        if kind == "jobs_per_minute":
            limit = self.settings.project_max_jobs_per_minute
            return OverQuota(f"This project may submit at most {limit} jobs per minute.", retry_after)
        limit = self.settings.project_max_queued_images
        return OverQuota(
            f"This project may have at most {limit} images queued or running at once; it has {refusal[2]} "
            f"and this asks for {images} more. Try again when some have finished.",
            retry_after,
        )

    async def set_paused(self, project: str, paused: bool) -> None:
        """Paused: runs in flight finish, no new run of the project starts until resumed."""
        # An operator's pause or resume replaces a pause for budget, which then no longer ends by
        # itself. Taken out first: the budget loop's resume (resume_budget_pauses.lua) checks the
        # entry in the same step as it resumes, so it can never undo the operator's word.
        await self.redis.zrem(keys.BUDGET_PAUSES, project)
        await scripts.SET_PAUSED(self.redis, [keys.project_paused(project)], [project, int(paused)])

    async def set_weights(self, weights: dict[str, float]) -> None:
        """The operator's fair-share weights (every other project weighs 1)."""
        args: list[Any] = []
        for project, weight in weights.items():
            args += [project, weight]
        await scripts.SET_WEIGHTS(self.redis, [keys.WEIGHTS, keys.BACKLOG, keys.BACKLOG_WEIGHT], args)

    async def set_priority(self, job_id: str, priority: int) -> bool:
        """False when every run of the job has already started."""
        args = [job_id, priority, PRIORITY_SCALE]
        return (await scripts.SET_PRIORITY(self.redis, [keys.job(job_id)], args)).done

    async def transition(self, job_id: str, from_status: JobStatus, to_status: JobStatus, **fields: Any) -> bool:
        args: list[Any] = [job_id, from_status.value, to_status.value, time.time()]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        return (await scripts.TRANSITION_JOB(self.redis, [keys.job(job_id)], args)).done

    async def cancel(self, job_id: str) -> tuple[bool, str]:
        """(True, runs stopped) or (False, the status that forbids canceling)."""
        canceled = await scripts.CANCEL(self.redis, [keys.job(job_id)], [job_id, time.time()])
        return canceled.done, str(canceled.values[0])

    async def redo(self, job_id: str, indices: Sequence[int]) -> tuple[bool, str]:
        """Queue redo runs of at most the lane's run size; (False, status) if the job is not finished.
        OverQuota if the project's live-images quota has no room for them (nothing changes)."""
        await self.memory.check()
        if await self.redis.hget(keys.job(job_id), "archived"):
            await self.restore(job_id)
        ordered = sorted(set(indices))
        first = await self.redis.hincrby(keys.job(job_id), "redo_runs", 0)
        size = self.settings.run_size_for(await self.redis.hget(keys.job(job_id), "lane") or "realtime")
        chunks = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        await self.redis.hincrby(keys.job(job_id), "redo_runs", len(chunks))
        args: list[Any] = [job_id, time.time(), self.settings.project_max_queued_images, len(ordered)]
        for n, chunk in enumerate(chunks, start=first):
            args += [keys.run_id(job_id, f"r{n}"), ",".join(map(str, chunk))]
        redo_keys = [keys.job(job_id), keys.job_images(job_id)]
        redone = await scripts.REDO(self.redis, redo_keys, args)
        if redone.answer == Answer.ARCHIVED:  # archived again between the restore and the redo: once more
            await self.restore(job_id)
            redone = await scripts.REDO(self.redis, redo_keys, args)
        if redone.answer == Answer.OVER_QUOTA:
            raise self._over_quota(redone.values, len(ordered))
        return redone.done, str(redone.values[0])

    # --- hot and cold ---

    async def archive_job(self, job_id: str) -> bool:
        """Move a final job's config and image records to its archive object, leaving its summary in
        Redis, and unlink its run records; True if archived by this call (idempotent)."""
        if self.archive is None:
            raise RuntimeError("this JobStore has no archive")
        key = keys.job(job_id)
        status, archived, runs_total, redo_runs, config = await self.redis.hmget(
            key, "status", "archived", "runs_total", "redo_runs", "config"
        )
        if archived or status is None or JobStatus(status) not in FINAL_JOB_STATUSES or config is None:
            return False
        images = await self.redis.hgetall(keys.job_images(job_id))
        records = ArchivedRecords(job_id=job_id, config=config, images={int(k): v for k, v in images.items()})
        await self.archive.write(records)
        if not (await scripts.DROP_ARCHIVED(self.redis, [key, keys.job_images(job_id)], [runs_total])).done:
            return False
        redone = int(redo_runs or 0)
        runs = [keys.run_id(job_id, n) for n in range(int(runs_total or 0) - redone)]
        runs += [keys.run_id(job_id, f"r{n}") for n in range(redone)]
        for start in range(0, len(runs), 1000):
            await self.redis.unlink(*[keys.run(run_id) for run_id in runs[start : start + 1000]])
        return True

    async def restore(self, job_id: str) -> None:
        """Bring an archived job's records back to Redis (before a redo reopens it)."""
        if self.archive is None:
            raise RuntimeError("this JobStore has no archive")
        records = await self.archive.read(job_id)
        items = list(records.images.items())
        # In slices, so no single command holds Redis for long; nothing else writes a final job's images.
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(items), 1000):
                pipe.hset(keys.job_images(job_id), mapping=dict(items[start : start + 1000]))
            await pipe.execute()
        await scripts.RESTORE(self.redis, [keys.job(job_id)], [records.config])

    # --- images ---

    async def images(self, job_id: str) -> dict[int, ImageRecord]:
        return (await self.records(job_id))[1]

    async def records_page(self, job_id: str, start: int, count: int) -> tuple[JobConfig, dict[int, ImageRecord]]:
        """Like `records`, for slots start..start+count-1 only: a live job's page costs one HMGET of
        `count` fields, whatever the job's size. KeyError if the job is gone."""
        indices = [str(index) for index in range(start, start + count)]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.job(job_id), "config", "archived")
            if indices:  # HMGET needs a field
                pipe.hmget(keys.job_images(job_id), indices)
            (config, archived), *found = await pipe.execute()
        values = found[0] if found else []
        images: dict[str, str] = {k: v for k, v in zip(indices, values, strict=True) if v is not None}
        if archived and self.archive is not None:
            page = await self.archive.read_page(job_id, start, count)
            config, images = page.config, {str(index): record for index, record in page.images.items()}
        if config is None:
            raise KeyError(job_id)
        records = {int(k): ImageRecord.model_validate_json(v) for k, v in images.items()}
        return _config_adapter.validate_json(config), records

    async def records(self, job_id: str) -> tuple[JobConfig, dict[int, ImageRecord]]:
        """The job's config and image outcomes, from Redis or, once archived, from its archive
        (one read of it). KeyError if the job is gone."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.job(job_id), "config", "archived")
            pipe.hgetall(keys.job_images(job_id))
            (config, archived), images = await pipe.execute()
        if archived and self.archive is not None:  # a restore may be half-way: the archive is whole
            archived_records = await self.archive.read(job_id)
            config, images = archived_records.config, archived_records.images
        if config is None:
            raise KeyError(job_id)
        records = {int(k): ImageRecord.model_validate_json(v) for k, v in images.items()}
        return _config_adapter.validate_json(config), records

    # --- queue figures for status views ---

    async def queue_figures(self, job: JobRecord) -> QueueFigures:
        """Queue position in the job's project, and the ETA split into waiting and running.

        Under fair share a job waits only for its own project's work: the runs ahead of it (the
        project's runs in flight and due retries, and its jobs ahead at the project's average runs
        left per queued job) and its own runs left are spread over the project's share of the cap
        (its weight over the weight of all projects with work, at most the per-project cap) at the
        observed average run time. One script call, O(log n) in the jobs and projects queued."""
        if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
            return NO_FIGURES
        _, *figures = (await scripts.QUEUE_FIGURES(self.redis, [keys.job(job.id)], [job.id])).values
        return self._figures(job, *figures)

    async def status_for_project(self, project: str, job_id: str) -> tuple[JobRecord, QueueFigures] | None:
        """The job (None if it is not the project's) and its queue figures, read together in one call."""
        if not is_id(job_id):
            return None
        values, *figures = (await self._status(self.redis, [keys.job(job_id)], [job_id])).values
        job = job_record(values)
        if job is None or job.project != project:
            return None
        if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
            return job, NO_FIGURES
        return job, self._figures(job, *figures)

    def _figures(
        self, job: JobRecord, score: Any, ahead: int, runs_ahead: int, avg: str | None, share: str
    ) -> QueueFigures:
        position = ahead + 1 if job.status == JobStatus.QUEUED and score is not None else None
        if avg is None:
            return QueueFigures(position, None, None)
        cap = self.settings.max_concurrency * float(share)
        if self.settings.project_max_concurrency:
            cap = min(cap, self.settings.project_max_concurrency)
        per_run = float(avg)
        remaining = job.runs_total - job.runs_done
        waiting = math.ceil(runs_ahead / cap) * per_run
        running = math.ceil(remaining / cap) * per_run
        return QueueFigures(position, round(waiting, 1), round(running, 1))
