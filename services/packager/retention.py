"""Retention: finished jobs and downloads older than BUNCH_RETENTION_DAYS are deleted, objects too,
and so are the uploads and datasets nothing used for as long (services/packager/upload_retention.py).

A daily arq cron job runs `purge_expired` inside the packager process. A job's Redis records are
removed first, in one transaction that also notes the job in keys.PURGING; its objects are deleted
after, and the note is cleared last. A purge interrupted in between is finished by the next one,
so no object is left behind, and a job is never half there (records pointing at deleted objects).
"""

import asyncio
import contextlib
import logging
import time
from datetime import UTC
from enum import Enum
from typing import Any

from arq.connections import ArqRedis
from arq.cron import cron
from arq.worker import Worker
from minio.deleteobjects import DeleteObject
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from services.packager.upload_retention import purge_unused_datasets, purge_unused_uploads
from shared import keys
from shared.models import FINAL_STATUS_VALUES
from shared.redis_connection import connect
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.records import ImageRecord

log = logging.getLogger(__name__)

DAY = 24 * 3600
PAGE = 200
PURGE_TIMEOUT_SECONDS = 6 * 3600
_JOB_FIELDS = ("project", "status", "created_at", "completed_at", "group_id", "zip_key")


class _Outcome(Enum):
    PURGED = "purged"
    KEPT = "kept"
    DANGLING = "dangling"  # listed in the project's index, but its record is gone


# --- objects ---


def _delete_objects(storage: Storage, prefix: str, extra: set[str]) -> int:
    """Blocking. Delete every object under `prefix` and the `extra` keys; returns how many."""
    listed = storage.client.list_objects(storage.bucket, prefix=prefix, recursive=True)
    names = {obj.object_name for obj in listed if obj.object_name} | extra
    errors = list(storage.client.remove_objects(storage.bucket, (DeleteObject(name) for name in sorted(names))))
    if errors:
        raise RuntimeError(f"could not delete {len(errors)} objects under {prefix}: {errors[0]}")
    return len(names)


def _job_prefix(job_id: str) -> str:
    return keys.zip_object(job_id).rsplit("/", 1)[0] + "/"


def _download_prefix(download_id: str) -> str:
    return keys.download_object(download_id).rsplit("/", 1)[0] + "/"


async def _finish_interrupted(redis: Redis, storage: Storage) -> None:
    for job_id in await redis.smembers(keys.PURGING):
        await asyncio.to_thread(_delete_objects, storage, _job_prefix(job_id), set())
        await redis.srem(keys.PURGING, job_id)


# --- jobs ---


def _expired(fields: dict[str, str | None], cutoff: float) -> bool:
    if fields["status"] not in FINAL_STATUS_VALUES:
        return False
    # A final job without completed_at (should not happen) ages from its creation.
    finished = fields["completed_at"] or fields["created_at"] or "0"
    return float(finished) <= cutoff


async def _image_keys(redis: Redis, job_id: str) -> set[str]:
    found = set()
    for raw in await redis.hvals(keys.job_images(job_id)):
        record = ImageRecord.model_validate_json(raw)
        if record.object_key:
            found.add(record.object_key)
    return found


async def _purge_job(redis: Redis, storage: Storage, jobs_index: str, job_id: str, cutoff: float) -> _Outcome:
    async with redis.pipeline(transaction=True) as pipe:
        # Watched: a job reopened meanwhile (a redo) aborts its deletion.
        await pipe.watch(keys.job(job_id))
        fields = dict(zip(_JOB_FIELDS, await pipe.hmget(keys.job(job_id), *_JOB_FIELDS), strict=True))
        if fields["project"] is None:
            await pipe.unwatch()
            await redis.zrem(jobs_index, job_id)
            return _Outcome.DANGLING
        if not _expired(fields, cutoff):
            return _Outcome.KEPT
        object_keys = await _image_keys(redis, job_id) | {keys.zip_object(job_id)}
        if fields["zip_key"]:
            object_keys.add(fields["zip_key"])
        project = fields["project"]
        pipe.multi()
        pipe.sadd(keys.PURGING, job_id)
        pipe.delete(keys.job(job_id), keys.job_images(job_id))
        pipe.zrem(keys.project_jobs(project), job_id)
        pipe.zrem(keys.project_failed_jobs(project), job_id)
        pipe.zrem(keys.project_live_jobs(project), job_id)
        pipe.hincrby(keys.project_counts(project), str(fields["status"]), -1)
        pipe.hincrby(keys.JOB_COUNTS, str(fields["status"]), -1)
        if fields["group_id"]:
            pipe.zrem(keys.group_jobs(fields["group_id"]), job_id)
        try:
            await pipe.execute()
        except WatchError:
            return _Outcome.KEPT  # changed under us; the next purge looks again
    await asyncio.to_thread(_delete_objects, storage, _job_prefix(job_id), object_keys)
    await redis.srem(keys.PURGING, job_id)
    return _Outcome.PURGED


async def _purge_index(redis: Redis, storage: Storage, jobs_index: str, cutoff: float) -> int:
    """Purge the expired jobs of one project's index (scored by creation time)."""
    removed, offset = 0, 0
    while True:
        # A job finished before the cutoff was created before it too: only those are looked at.
        # Purged and dangling ids leave the index, so the offset only skips the ones kept.
        job_ids = await redis.zrangebyscore(jobs_index, "-inf", cutoff, start=offset, num=PAGE)
        if not job_ids:
            return removed
        for job_id in job_ids:
            outcome = await _purge_job(redis, storage, jobs_index, job_id, cutoff)
            removed += outcome == _Outcome.PURGED
            offset += outcome == _Outcome.KEPT


async def _project_job_indexes(redis: Redis) -> list[str]:
    prefix, suffix = keys.project_jobs("\0").split("\0")
    found = [key async for key in redis.scan_iter(match=f"{prefix}*{suffix}", count=1000, _type="zset")]
    # The pattern could also match another key shape ending the same way: keep exact ones only.
    return [key for key in found if key == keys.project_jobs(_project_of_index(key))]


def _project_of_index(jobs_index: str) -> str:
    prefix, suffix = keys.project_jobs("\0").split("\0")
    return jobs_index[len(prefix) : len(jobs_index) - len(suffix)]


async def _trim_hourly(redis: Redis, project: str, cutoff: float) -> None:
    """The project's hourly figures older than the retention go with the jobs they counted."""
    first_hour = int(cutoff // 3600)
    old = [field for field in await redis.hkeys(keys.project_hourly(project)) if int(field.split(":")[0]) < first_hour]
    for start in range(0, len(old), 1000):
        await redis.hdel(keys.project_hourly(project), *old[start : start + 1000])


# --- downloads ---


async def purge_expired_downloads(redis: Redis, storage: Storage, cutoff: float) -> int:
    removed = 0
    while download_ids := await redis.zrangebyscore(keys.DOWNLOADS_BY_TIME, "-inf", cutoff, start=0, num=PAGE):
        for download_id in download_ids:
            # Objects first: the record is the only pointer to them, and to the next retry.
            await asyncio.to_thread(_delete_objects, storage, _download_prefix(download_id), set())
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(keys.download(download_id))
                pipe.zrem(keys.DOWNLOADS_BY_TIME, download_id)
                await pipe.execute()
            removed += 1
    return removed


# --- exports ---


async def purge_expired_exports(redis: Redis, cutoff: float) -> int:
    """Forget exports created before `cutoff` (their objects are the project's, in its own bucket)."""
    removed = 0
    while export_ids := await redis.zrangebyscore(keys.EXPORTS_BY_TIME, "-inf", cutoff, start=0, num=PAGE):
        async with redis.pipeline(transaction=False) as reads:
            for export_id in export_ids:
                reads.hget(keys.export(export_id), "project")
            projects = await reads.execute()
        async with redis.pipeline(transaction=True) as pipe:
            for export_id, project in zip(export_ids, projects, strict=True):
                pipe.delete(keys.export(export_id), keys.export_done(export_id), keys.export_errors(export_id))
                pipe.zrem(keys.EXPORTS_BY_TIME, export_id)
                if project:
                    pipe.zrem(keys.project_exports(project), export_id)
                    pipe.srem(keys.project_active_exports(project), export_id)
            await pipe.execute()
        removed += len(export_ids)
    return removed


async def purge_expired(redis: Redis, storage: Storage, settings: Settings, now: float) -> int:
    """Delete finished jobs whose completion is older than the retention, with their objects and
    index entries (and old downloads); returns the number of jobs removed."""
    cutoff = now - settings.retention_days * DAY
    await _finish_interrupted(redis, storage)
    removed = 0
    job_indexes = await _project_job_indexes(redis)
    for jobs_index in job_indexes:
        removed += await _purge_index(redis, storage, jobs_index, cutoff)
    downloads = await purge_expired_downloads(redis, storage, cutoff)
    exports = await purge_expired_exports(redis, cutoff)
    for jobs_index in job_indexes:
        await _trim_hourly(redis, _project_of_index(jobs_index), cutoff)
    # After the jobs: the uploads only they named are free to go now.
    datasets = await purge_unused_datasets(redis, cutoff)
    uploads = await purge_unused_uploads(redis, storage, cutoff, now, job_indexes)
    log.info(
        "retention: %s jobs, %s downloads, %s exports, %s datasets and %s uploads older than %s days removed",
        removed,
        downloads,
        exports,
        datasets,
        uploads,
        settings.retention_days,
    )
    return removed


# --- the schedule (arq) ---


async def purge(ctx: dict[str, Any]) -> int:
    """The arq cron job."""
    return await purge_expired(ctx["bunch_redis"], ctx["storage"], ctx["settings"], time.time())


def worker_settings(settings: Settings) -> dict[str, Any]:
    """arq WorkerSettings for the retention schedule (keyword arguments of arq.worker.Worker)."""
    return {
        "functions": [],
        "cron_jobs": [
            cron(
                purge,
                hour={settings.retention_hour},
                minute={settings.retention_minute},
                run_at_startup=settings.retention_run_at_startup,
                timeout=PURGE_TIMEOUT_SECONDS,
                # unique (the default): with several packager replicas the purge still runs once.
            )
        ],
        "queue_name": keys.ARQ_QUEUE,
        "health_check_key": f"{keys.ARQ_QUEUE}:health-check",
        # Its own client (arq reads bytes), reaching the primary as every other one does: through
        # Sentinel when BUNCH_REDIS_URL names it (arq's own RedisSettings cannot take that URL).
        "redis_pool": connect(settings, client_class=ArqRedis, decode_responses=False),
        "timezone": UTC,
        "keep_result": 24 * 3600,
        # Only a daily cron job runs here: no need to ask Redis for work twice a second.
        "poll_delay": 2.0,
    }


class RetentionSchedule:
    """Runs the arq worker as one of the packager's loops, stopping with the others."""

    def __init__(self, redis: Redis, storage: Storage, settings: Settings) -> None:
        self.redis = redis
        self.storage = storage
        self.settings = settings

    def _worker(self) -> Worker:
        context = {"bunch_redis": self.redis, "storage": self.storage, "settings": self.settings}
        # handle_signals=False: SIGTERM belongs to run_until_signalled, which sets `stop`.
        return Worker(**worker_settings(self.settings), handle_signals=False, ctx=context)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            worker = self._worker()
            work = asyncio.create_task(worker.async_run())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            await self._close(worker, work)
            if stop.is_set():
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5)  # then start a fresh worker

    @staticmethod
    async def _close(worker: Worker, work: asyncio.Task[None]) -> None:
        # arq logs this as "shutdown on SIGUSR1": the name it gives a stop it did not get by signal.
        with contextlib.suppress(asyncio.CancelledError, RedisConnectionError, OSError):
            await worker.close()
        try:
            await work
        except asyncio.CancelledError:
            pass
        except (RedisConnectionError, OSError) as exc:
            log.warning("retention schedule lost redis (%s); restarting it", exc)
