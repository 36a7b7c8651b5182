"""Jobs, runs and images in Redis: the state of record, read and changed by every service."""

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shared import keys, planning, scripts
from shared.archive import ArchivedRecords, JobArchive
from shared.errors import Invalid, OverQuota
from shared.ids import is_id
from shared.models import FINAL_JOB_STATUSES, ImageStatus, JobRequest, JobStatus, RunStatus
from shared.planning import JobConfig
from shared.redis_memory import MemoryGuard
from shared.scripts import Answer
from shared.settings import Settings

_config_adapter: TypeAdapter[JobConfig] = TypeAdapter(JobRequest)

# score = priority * scale + sequence: lower runs sooner, first in first out among equals.
# 2**32 keeps every score within the 14 digits Lua prints exactly.
PRIORITY_SCALE = 2**32


class MissingKeys(Exception):
    """Keys a write required do not exist (by their indices among those given); nothing was written."""

    def __init__(self, indices: list[int]) -> None:
        super().__init__(indices)
        self.indices = indices


class JobRecord(BaseModel):
    id: str
    project: str
    mode: str
    group: str
    group_id: str | None = None
    priority: int
    seq: int = 0
    status: JobStatus
    images_total: int
    runs_total: int
    runs_started: int = 0
    runs_done: int = 0
    images_succeeded: int = 0
    images_failed: int = 0
    tokens: int = 0
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    zip_key: str | None = None
    zip_bytes: int | None = None
    retry_of: str | None = None
    retried_by: str | None = None
    webhook_url: str | None = None


_JOB_FIELDS = list(JobRecord.model_fields)


class ImageRecord(BaseModel):
    """The outcome of one image slot's latest attempt (stored as JSON in the job's images hash)."""

    status: ImageStatus
    attempt: int
    object_key: str | None = None
    mime_type: str | None = None
    bytes: int | None = None
    crc32: int | None = None
    error: str | None = None
    detail: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finished_at: float


class RunRecord(BaseModel):
    job_id: str
    project: str
    attempt: int
    status: RunStatus
    runpod_id: str = ""
    dispatched_at: float | None = None
    last_error: str | None = None
    slots: str | None = None  # redo runs only: "3,7"


def _present(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if v is not None and v != ""}


def _job_record(values: Sequence[str | None]) -> JobRecord | None:
    """A JobRecord from the values of _JOB_FIELDS, in order (None when the job does not exist)."""
    if values[0] is None:
        return None
    fields = _present(dict(zip(_JOB_FIELDS, values, strict=True)))
    if "zip_bytes" in fields and "zip_key" not in fields:
        # Not stored: derived from the id, a value that long would cost the hash its compact encoding.
        fields["zip_key"] = keys.zip_object(fields["id"])
    return JobRecord.model_validate(fields)


@dataclass(frozen=True, slots=True)
class StartedRun:
    """A run attempt RunPod accepted, as the id RunPod gave it."""

    run_id: str
    attempt: int
    runpod_id: str


@dataclass(frozen=True, slots=True)
class Completion:
    """A run attempt's final outcome, image by image, to store once (Lua COMPLETE)."""

    run_id: str
    attempt: int
    status: RunStatus
    images: dict[int, ImageRecord]

    def keys(self) -> list[str]:
        job_id, _ = keys.split_run_id(self.run_id)
        return [keys.run(self.run_id), keys.job(job_id), keys.job_images(job_id)]

    def args(self, now: float) -> list[Any]:
        job_id, _ = keys.split_run_id(self.run_id)
        succeeded = sum(1 for r in self.images.values() if r.status == ImageStatus.SUCCEEDED)
        tokens = sum(r.prompt_tokens + r.output_tokens for r in self.images.values())
        args: list[Any] = [self.run_id, job_id, self.attempt, now, self.status.value, succeeded]
        args += [len(self.images) - succeeded, tokens]
        for index, record in self.images.items():
            args += [index, record.model_dump_json(exclude_none=True)]
        return args


@dataclass(frozen=True, slots=True)
class Claims:
    runs: list[tuple[str, int]]  # run_id, attempt
    recorded: list[bool]  # per started run given: False if that attempt was no longer live


class JobStore:
    """`archive` (object storage) holds finished jobs' config and image records once they left
    Redis; without it (the dispatcher's, the tests'), an archived job's records read as gone."""

    def __init__(self, redis: Redis, settings: Settings, archive: JobArchive | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.archive = archive
        self.memory = MemoryGuard(redis, settings.redis_memory_refuse_fraction)
        self._status = scripts.queue_figures(_JOB_FIELDS)

    # --- jobs ---

    async def create(
        self,
        project: str,
        config: JobConfig,
        *,
        group_id: str | None = None,
        group_name: str | None = None,
        retry_of: str | None = None,
        required: Sequence[str] = (),
    ) -> JobRecord:
        """Store a queued job and publish it for the dispatcher, all or nothing, in one script call.

        The job goes in group `group_id`, or in the project's group named `group_name` (created if
        there is none). With `required` (distinct keys: its uploads), only if they all exist: else
        MissingKeys with their indices, and nothing is written. Over an operator quota: OverQuota
        (Invalid for a job larger than the quota itself); Redis short of memory: Unavailable."""
        record = JobRecord(
            id=uuid.uuid4().hex,
            project=project,
            mode=config.mode,
            group=config.group,
            priority=config.priority,
            status=JobStatus.QUEUED,
            images_total=planning.images_total(config),
            runs_total=planning.runs_total(config, self.settings.run_size),
            created_at=time.time(),
            retry_of=retry_of,
            webhook_url=config.webhook_url,
        )
        max_live_images = self.settings.project_max_queued_images
        if max_live_images and record.images_total > max_live_images:
            raise Invalid(
                f"The job asks for {record.images_total} images; this project may have at most "
                f"{max_live_images} images queued or running at once. Split it into smaller jobs."
            )
        await self.memory.check()
        fields = _present(record.model_dump(mode="json", exclude={"seq", "group_id"}))
        fields["config"] = config.model_dump_json()
        args: list[Any] = [record.id, project, record.created_at, record.priority, PRIORITY_SCALE]
        # Strings, so Redis stores each value exactly as redis-py would have written it; raw UTF-8,
        # so text reaches Redis as the encoder would have sent it.
        values = json.dumps({name: str(value) for name, value in fields.items()}, ensure_ascii=False)
        args += [group_id or "", retry_of or "", values, group_name or "", uuid.uuid4().hex]
        args += [record.images_total, max_live_images, self.settings.project_max_jobs_per_minute]
        created = await scripts.CREATE(self.redis, list(required), args)
        if created[0] == Answer.MISSING:
            raise MissingKeys([int(position) - 1 for position in created[1]])
        if created[0] == Answer.OVER_QUOTA:
            raise self._over_quota(created[1:], record.images_total)
        record.seq = int(created[1])
        record.group_id = str(created[2]) or None
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        # Named fields only: the config of a 10,000-input job stays out of status reads.
        return _job_record(await self.redis.hmget(keys.job(job_id), _JOB_FIELDS))

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(keys.job(job_id), _JOB_FIELDS)
            rows = await pipe.execute()
        return [job for job in map(_job_record, rows) if job is not None]

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

    def _over_quota(self, answer: list[Any], images: int) -> OverQuota:
        kind, retry_after = str(answer[0]), int(answer[1])
        if kind == "jobs_per_minute":
            limit = self.settings.project_max_jobs_per_minute
            return OverQuota(f"This project may submit at most {limit} jobs per minute.", retry_after)
        limit = self.settings.project_max_queued_images
        return OverQuota(
            f"This project may have at most {limit} images queued or running at once; it has {answer[2]} "
            f"and this asks for {images} more. Try again when some have finished.",
            retry_after,
        )

    async def set_paused(self, project: str, paused: bool) -> None:
        """Paused: runs in flight finish, no new run of the project starts until resumed."""
        await scripts.SET_PAUSED(self.redis, [keys.project_paused(project)], [project, int(paused)])

    async def set_weights(self, weights: dict[str, float]) -> None:
        """The operator's fair-share weights (every other project weighs 1)."""
        args: list[Any] = []
        for project, weight in weights.items():
            args += [project, weight]
        await scripts.SET_WEIGHTS(self.redis, [keys.WEIGHTS, keys.BACKLOG, keys.BACKLOG_WEIGHT], args)

    async def admit(self, job_id: str) -> bool:
        """Put an accepted job in its project's queue (idempotent: a redelivery changes nothing)."""
        return await scripts.ADMIT(self.redis, [keys.job(job_id)], [job_id, PRIORITY_SCALE]) == Answer.DONE

    async def set_priority(self, job_id: str, priority: int) -> bool:
        """False when every run of the job has already started."""
        answer = await scripts.SET_PRIORITY(self.redis, [keys.job(job_id)], [job_id, priority, PRIORITY_SCALE])
        return answer == Answer.DONE

    async def transition(self, job_id: str, from_status: JobStatus, to_status: JobStatus, **fields: Any) -> bool:
        args: list[Any] = [job_id, from_status.value, to_status.value, time.time()]
        for name, value in fields.items():
            args += [name, "" if value is None else value]
        return await scripts.TRANSITION(self.redis, [keys.job(job_id)], args) == Answer.DONE

    async def cancel(self, job_id: str) -> tuple[bool, str]:
        """(True, runs stopped) or (False, the status that forbids canceling)."""
        answer, detail = await scripts.CANCEL(self.redis, [keys.job(job_id)], [job_id, time.time()])
        return answer == Answer.DONE, str(detail)

    async def redo(self, job_id: str, indices: Sequence[int]) -> tuple[bool, str]:
        """Queue redo runs of at most run_size images; (False, status) if the job is not finished.
        OverQuota if the project's live-images quota has no room for them (nothing changes)."""
        await self.memory.check()
        if await self.redis.hget(keys.job(job_id), "archived"):
            await self.restore(job_id)
        ordered = sorted(set(indices))
        first = await self.redis.hincrby(keys.job(job_id), "redo_runs", 0)
        size = self.settings.run_size
        chunks = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        await self.redis.hincrby(keys.job(job_id), "redo_runs", len(chunks))
        args: list[Any] = [job_id, time.time(), self.settings.project_max_queued_images, len(ordered)]
        for n, chunk in enumerate(chunks, start=first):
            args += [keys.run_id(job_id, f"r{n}"), ",".join(map(str, chunk))]
        redo_keys = [keys.job(job_id), keys.job_images(job_id)]
        answer = await scripts.REDO(self.redis, redo_keys, args)
        if answer[0] == Answer.ARCHIVED:  # archived again between the restore and the redo: once more
            await self.restore(job_id)
            answer = await scripts.REDO(self.redis, redo_keys, args)
        if answer[0] == Answer.OVER_QUOTA:
            raise self._over_quota(answer[1:], len(ordered))
        return answer[0] == Answer.DONE, str(answer[1])

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
        if await scripts.ARCHIVE(self.redis, [key, keys.job_images(job_id)], [runs_total]) != Answer.DONE:
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

    # --- runs ---

    async def acquire(self, now: float, deadline: float) -> tuple[str, int] | None:
        """Claim the next run to start if every cap allows it (atomic across replicas)."""
        claimed = (await self.acquire_many(now, deadline, 1)).runs
        return claimed[0] if claimed else None

    async def acquire_many(self, now: float, deadline: float, limit: int, started: Sequence[StartedRun] = ()) -> Claims:
        """Record the RunPod ids of `started`, then claim up to `limit` runs, in the order single
        claims would take them (fewer than `limit`: no more can start now)."""
        args = self._claim_args(now, deadline, limit, started)
        return _claims(await scripts.RECORD_STARTED_AND_CLAIM(self.redis, [], args))

    async def settle_and_claim(
        self, completions: Sequence[Completion], now: float, deadline: float, limit: int, started: Sequence[StartedRun]
    ) -> tuple[list[bool | Exception], Claims | Exception]:
        """A dispatcher pass in one round trip: COMPLETE each finished run (True: recorded now, not
        before), then acquire_many. Each part succeeds or fails on its own."""
        calls = [(scripts.COMPLETE, completion.keys(), completion.args(now)) for completion in completions]
        calls.append((scripts.RECORD_STARTED_AND_CLAIM, [], self._claim_args(now, deadline, limit, started)))
        *completed, claimed = await self._evalsha_all(calls)
        outcomes = [answer if isinstance(answer, Exception) else bool(answer) for answer in completed]
        return outcomes, claimed if isinstance(claimed, Exception) else _claims(claimed)

    def _claim_args(self, now: float, deadline: float, limit: int, started: Sequence[StartedRun]) -> list[Any]:
        s = self.settings
        cap = s.max_concurrency + s.dispatch_prefetch
        args: list[Any] = [cap, now, deadline, s.project_max_concurrency, s.dispatch_rpm, limit]
        for run in started:
            args += [run.run_id, run.attempt, run.runpod_id]
        return args

    async def _evalsha_all(self, calls: Sequence[tuple[scripts.Script, list[str], list[Any]]]) -> list[Any]:
        """Run scripts in one pipeline by SHA; answers are results or the error of that call.

        redis-py's own pipelined scripts cost a SCRIPT EXISTS round trip on every execute. Here a
        script Redis no longer knows (it restarted, or failed over) is loaded and only the calls it
        refused run again.
        """
        answers: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    script, script_keys, args = calls[i]
                    pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
                results = await pipe.execute(raise_on_error=False)
            for i, result in zip(todo, results, strict=True):
                answers[i] = result
            todo = [i for i in todo if isinstance(answers[i], NoScriptError)]
            if not todo:
                break
            for script in {calls[i][0] for i in todo}:
                await self.redis.script_load(script.text)
        return answers

    async def requeue(self, run_id: str, attempt: int, ready_at: float, *, new_attempt: bool, reason: str) -> int:
        """Schedule a run again; returns the attempt it will run as (0 if it was not live)."""
        args = [run_id, attempt, ready_at, int(new_attempt), reason]
        return int(await scripts.REQUEUE(self.redis, [keys.run(run_id)], args))

    async def complete(self, completion: Completion) -> bool:
        """Store a run's final outcome once; the last run of a job moves it to packaging."""
        return await scripts.COMPLETE(self.redis, completion.keys(), completion.args(time.time())) == Answer.DONE

    async def run(self, run_id: str) -> RunRecord | None:
        raw = await self.redis.hgetall(keys.run(run_id))
        return RunRecord.model_validate(_present(raw)) if raw else None

    async def run_slots(self, run_id: str, config: JobConfig) -> Sequence[int]:
        """The image indices a run produces: planned runs by their index, redo runs as recorded."""
        _, name = keys.split_run_id(run_id)
        if name.isdigit():
            return planning.run_slots(config, int(name), self.settings.run_size)
        slots = await self.redis.hget(keys.run(run_id), "slots")
        return [int(i) for i in (slots or "").split(",") if i]

    async def overdue_runs(self, now: float, limit: int = 100) -> list[str]:
        return list(await self.redis.zrangebyscore(keys.RUNNING, "-inf", now, start=0, num=limit))

    async def forget_run(self, run_id: str, project: str) -> None:
        """Drop a run's stray in-flight entries (its run was settled), freeing the slots it held."""
        await scripts.FORGET_RUN(self.redis, [], [run_id, project])

    async def postpone(self, run_id: str, deadline: float) -> None:
        await self.redis.zadd(keys.RUNNING, {run_id: deadline}, xx=True)

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

    async def queue_figures(self, job: JobRecord) -> "QueueFigures":
        """Queue position in the job's project, and the ETA split into waiting and running.

        Under fair share a job waits only for its own project's work: the runs ahead of it (the
        project's runs in flight and due retries, and its jobs ahead at the project's average runs
        left per queued job) and its own
        runs left are spread over the project's share of the cap (its weight over the weight of all
        projects with work, at most the per-project cap) at the observed average run time. One
        script call, O(log n) in the jobs and projects queued."""
        if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
            return NO_FIGURES
        _, *figures = await scripts.QUEUE_FIGURES(self.redis, [keys.job(job.id)], [job.id])
        return self._figures(job, *figures)

    async def status_for_project(self, project: str, job_id: str) -> "tuple[JobRecord, QueueFigures] | None":
        """The job (None if it is not the project's) and its queue figures, read together in one call."""
        if not is_id(job_id):
            return None
        values, *figures = await self._status(self.redis, [keys.job(job_id)], [job_id])
        job = _job_record(values)
        if job is None or job.project != project:
            return None
        if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
            return job, NO_FIGURES
        return job, self._figures(job, *figures)

    def _figures(
        self, job: JobRecord, score: Any, ahead: int, runs_ahead: int, avg: str | None, share: str
    ) -> "QueueFigures":
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


def _claims(answer: list[Any]) -> Claims:
    claimed, recorded = answer
    runs = [(str(claimed[i]), int(claimed[i + 1])) for i in range(0, len(claimed), 2)]
    return Claims(runs, [bool(flag) for flag in recorded])


@dataclass(frozen=True, slots=True)
class QueueFigures:
    position: int | None
    wait_seconds: float | None
    run_seconds: float | None


NO_FIGURES = QueueFigures(None, None, None)
