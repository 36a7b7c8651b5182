"""Retention against a real redis-server and S3 server: old finished jobs go, objects and all."""

import asyncio
import json
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from deploy.processes import Process, base_env, python, scratch_dir, start_redis
from services.gateway.images import check_image
from services.gateway.intake import store_upload
from services.packager.retention import purge_expired
from services.packager.upload_retention import purge_unused_uploads
from shared import keys, scripts
from shared.errors import MissingKeys
from shared.models import SemiAutoJobRequest
from shared.scripts import Answer
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.datasets import DatasetStore
from shared.stores.downloads import DownloadStore
from shared.stores.jobs import JobStore
from shared.stores.uploads import PURGE_LEASE_SECONDS, UploadStore
from tests.stack_helpers import png_bytes

DAY = 24 * 3600
PROJECT = "retention"


@pytest.fixture(scope="module")
def private_redis() -> Iterator[tuple[str, Path]]:
    # Its own redis-server: a purge sweeps every project, and the packager started below consumes
    # streams; neither may touch the data of other test modules.
    workdir = scratch_dir("bunch-retention-")
    proc, url = start_redis(workdir)
    yield url, workdir
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis(private_redis: tuple[str, Path]) -> AsyncIterator[Redis]:
    client = Redis.from_url(private_redis[0], decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def retention_settings(settings: Settings, private_redis: tuple[str, Path]) -> Settings:
    return settings.model_copy(update={"redis_url": private_redis[0], "retention_days": 30})


async def seed_job(redis: Redis, storage: Storage, *, status: str, created: float, completed: float | None) -> str:
    """A job as the services leave it: hash, images with their objects, ZIP, and index entries."""
    job_id, group_id = uuid.uuid4().hex, uuid.uuid4().hex
    images = {}
    for index in range(2):
        key = keys.image_object(keys.run_id(job_id, 0), index, 1, "c0ffee00")
        await storage.put_bytes(key, b"png bytes", "image/png")
        images[str(index)] = json.dumps(
            {"status": "succeeded", "attempt": 1, "object_key": key, "finished_at": completed or created}
        )
    await storage.put_bytes(keys.zip_object(job_id), b"zip bytes", "application/zip")
    await storage.put_bytes(keys.archive_object(job_id), b"archived records", "application/gzip")
    fields = {
        "id": job_id,
        "project": PROJECT,
        "status": status,
        "group_id": group_id,
        "created_at": created,
        "zip_key": keys.zip_object(job_id),
    }
    if completed is not None:
        fields["completed_at"] = completed
    await redis.hset(keys.job(job_id), mapping=fields)
    await redis.hset(keys.job_images(job_id), mapping=images)
    await redis.zadd(keys.project_jobs(PROJECT), {job_id: created})
    await redis.zadd(keys.group_jobs(group_id), {job_id: created})
    await redis.hincrby(keys.project_counts(PROJECT), status, 1)
    return job_id


async def objects_of(storage: Storage, redis: Redis, job_id: str) -> list[bool]:
    raw = await redis.hvals(keys.job_images(job_id))
    object_keys = [json.loads(r)["object_key"] for r in raw] + [keys.zip_object(job_id)]
    return [await storage.exists(key) for key in object_keys]


async def test_purge_removes_old_finished_jobs_and_keeps_the_rest(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    now = time.time()
    old = await seed_job(redis, storage, status="completed", created=now - 41 * DAY, completed=now - 40 * DAY)
    old_failed = await seed_job(redis, storage, status="failed", created=now - 35 * DAY, completed=now - 31 * DAY)
    recent = await seed_job(redis, storage, status="completed", created=now - 31 * DAY, completed=now - 29 * DAY)
    running = await seed_job(redis, storage, status="processing", created=now - 50 * DAY, completed=None)
    old_objects = [
        k
        for j in (old, old_failed)
        for k in [*(json.loads(r)["object_key"] for r in await redis.hvals(keys.job_images(j)))]
    ]
    old_group = await redis.hget(keys.job(old), "group_id")
    assert all(await objects_of(storage, redis, old))

    assert await purge_expired(redis, storage, retention_settings, now) == 2

    for job_id in (old, old_failed):
        assert not await redis.exists(keys.job(job_id), keys.job_images(job_id))
        assert await redis.zscore(keys.project_jobs(PROJECT), job_id) is None
        assert not await storage.exists(keys.zip_object(job_id))
        assert not await storage.exists(keys.archive_object(job_id))  # the archive goes with the job
    assert not await redis.exists(keys.group_jobs(old_group))
    assert [await storage.exists(key) for key in old_objects] == [False] * 4
    for job_id in (recent, running):
        assert await redis.hget(keys.job(job_id), "project") == PROJECT
        assert await redis.zscore(keys.project_jobs(PROJECT), job_id) is not None
        assert all(await objects_of(storage, redis, job_id))
        assert await storage.exists(keys.archive_object(job_id))
    assert await redis.hgetall(keys.project_counts(PROJECT)) == {"completed": "1", "failed": "0", "processing": "1"}
    assert not await redis.smembers(keys.PURGING)

    # The project's hourly figures older than the retention go too; the rest stay.
    old_hour, kept_hour = int((now - 31 * DAY) // 3600), int((now - 29 * DAY) // 3600)
    await redis.hset(keys.project_hourly(PROJECT), mapping={f"{old_hour}:jobs": 3, f"{kept_hour}:jobs": 2})
    assert await purge_expired(redis, storage, retention_settings, now) == 0  # nothing left to do
    assert await redis.hgetall(keys.project_hourly(PROJECT)) == {f"{kept_hour}:jobs": "2"}
    # Two days later the recent one has aged out too; the unfinished one never does.
    assert await purge_expired(redis, storage, retention_settings, now + 2 * DAY) == 1
    assert await redis.exists(keys.job(running))


async def test_an_interrupted_purge_is_finished_and_old_downloads_go(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    # As left by a packager killed between deleting a job's records and its objects.
    job_id = uuid.uuid4().hex
    leftover = keys.image_object(keys.run_id(job_id, 0), 0, 1, "c0ffee00")
    await storage.put_bytes(leftover, b"x", "image/png")
    await redis.sadd(keys.PURGING, job_id)

    download = await DownloadStore(redis).create(PROJECT, ["g"])
    await storage.put_bytes(keys.download_object(download.id), b"zip", "application/zip")
    await redis.hset(keys.download(download.id), "zip_key", keys.download_object(download.id))

    await purge_expired(redis, storage, retention_settings, time.time())
    assert not await storage.exists(leftover)
    assert not await redis.smembers(keys.PURGING)
    assert await redis.exists(keys.download(download.id))  # young: kept

    await purge_expired(redis, storage, retention_settings, time.time() + 31 * DAY)
    assert not await redis.exists(keys.download(download.id))
    assert not await storage.exists(keys.download_object(download.id))
    assert await redis.zscore(keys.DOWNLOADS_BY_TIME, download.id) is None


async def test_the_packager_schedules_the_purge_and_stops_cleanly(
    redis: Redis, storage: Storage, retention_settings: Settings, private_redis: tuple[str, Path]
) -> None:
    now = time.time()
    old = await seed_job(redis, storage, status="canceled", created=now - 60 * DAY, completed=now - 60 * DAY)
    env = base_env(
        {
            "BUNCH_REDIS_URL": retention_settings.redis_url,
            "BUNCH_S3_ENDPOINT": retention_settings.s3_endpoint,
            "BUNCH_RETENTION_RUN_AT_STARTUP": "true",
            "BUNCH_ENV": "development",
            "BUNCH_CONSUMER_NAME": "packager-retention-test",
        }
    )
    workdir = private_redis[1]
    packager = Process("packager", python("-m", "services.packager"), env, workdir / "packager.log").start()
    try:
        # Records go first and the PURGING note is cleared last, after the objects: wait for both.
        for _ in range(100):  # up to 20 s
            if not await redis.exists(keys.job(old)) and not await redis.smembers(keys.PURGING):
                break
            await asyncio.sleep(0.2)
        assert not await redis.exists(keys.job(old)), packager.log_tail()
        assert not await redis.smembers(keys.PURGING), packager.log_tail()
        assert not await storage.exists(keys.zip_object(old))
        packager.signal(signal.SIGTERM)
        assert packager.popen is not None
        assert await asyncio.to_thread(packager.popen.wait, 10) == 0, packager.log_tail()
    finally:
        packager.stop()


# --- uploads and datasets ---


async def send(redis: Redis, storage: Storage, project: str, data: bytes) -> str:
    image = check_image(data, 50 * 1024 * 1024, 50_000_000)
    return (await store_upload(storage, UploadStore(redis), project, image, data)).id


async def upload_gone(redis: Redis, storage: Storage, upload_id: str, *projects: str) -> bool:
    records = [keys.upload(project, upload_id) for project in projects]
    return (
        not await redis.exists(*records, keys.upload_holders(upload_id))
        and await redis.zscore(keys.UPLOADS_BY_USE, upload_id) is None
        and not await storage.exists(keys.upload_object(upload_id))
    )


async def upload_kept(redis: Redis, storage: Storage, upload_id: str, project: str) -> bool:
    return bool(await redis.exists(keys.upload(project, upload_id))) and await storage.exists(
        keys.upload_object(upload_id)
    )


async def claimed_upload(redis: Redis, storage: Storage, width: int, claimed_at: float) -> tuple[str, bytes]:
    """An upload that retention claimed for deletion at `claimed_at` (its records are gone)."""
    data = png_bytes(seed=uuid.uuid4().int % 200, width=width)
    upload_id = await send(redis, storage, PROJECT, data)
    claim_keys = [keys.upload_holders(upload_id), keys.UPLOADS_BY_USE, keys.UPLOADS_PURGING]
    claimed = await scripts.CLAIM_UPLOAD(redis, claim_keys, [upload_id, time.time() + 1, claimed_at])
    assert claimed.answer == Answer.DONE
    return upload_id, data


async def test_uploads_and_datasets_nothing_used_go_and_the_rest_stay(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    now = time.time()
    tag = uuid.uuid4().int % 200
    free, named, in_dataset, resent = [
        await send(redis, storage, PROJECT, png_bytes(seed=tag, width=40 + i)) for i in range(4)
    ]
    await send(redis, storage, "other-project", png_bytes(seed=tag, width=40))  # the same image as `free`
    # A job still kept names one; a dataset used lately holds another; one is sent again lately.
    job_id = await seed_job(redis, storage, status="processing", created=now, completed=None)
    await redis.hset(keys.job(job_id), "config", json.dumps({"mode": "semi_auto", "reference_ids": [named]}))
    dataset_id = (await DatasetStore(redis).save(PROJECT, [in_dataset])).id
    old_dataset = (await DatasetStore(redis).save(PROJECT, [free])).id
    later = now + 2 * DAY
    await redis.zadd(keys.DATASETS_BY_USE, {dataset_id: later})
    await redis.zadd(keys.UPLOADS_BY_USE, {resent: later})

    await purge_expired(redis, storage, retention_settings, now + 31 * DAY)

    assert await upload_gone(redis, storage, free, PROJECT, "other-project")
    assert not await redis.exists(keys.dataset(old_dataset), keys.dataset_inputs(old_dataset))
    for kept in (named, in_dataset, resent):
        assert await upload_kept(redis, storage, kept, PROJECT), kept
    assert await redis.lrange(keys.dataset_inputs(dataset_id), 0, -1) == [in_dataset]
    assert not await redis.zrange(keys.UPLOADS_PURGING, 0, -1)
    # Gone means gone for jobs too: a new one naming it is refused, nothing written.
    config = SemiAutoJobRequest(mode="semi_auto", prompts=["p"], reference_ids=[free], images_per_prompt=1)
    with pytest.raises(MissingKeys):
        await JobStore(redis, retention_settings).create(PROJECT, config, required=[keys.upload(PROJECT, free)])


async def test_a_job_naming_an_old_upload_keeps_it_though_the_scan_missed_the_job(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    now = time.time()
    tag = uuid.uuid4().int % 200
    named, unnamed = [await send(redis, storage, PROJECT, png_bytes(seed=tag, width=50 + i)) for i in range(2)]
    await redis.zadd(keys.UPLOADS_BY_USE, {named: now - 40 * DAY, unnamed: now - 40 * DAY})
    config = SemiAutoJobRequest(mode="semi_auto", prompts=["p"], reference_ids=[named], images_per_prompt=1)
    job = await JobStore(redis, retention_settings).create(PROJECT, config, required=[keys.upload(PROJECT, named)])
    assert await redis.zscore(keys.UPLOADS_BY_USE, named) == pytest.approx(job.created_at)

    # No job index given: as if the job was created after the purge had looked at the jobs.
    assert await purge_unused_uploads(redis, storage, now - DAY, now, job_indexes=[]) == 1
    assert await upload_kept(redis, storage, named, PROJECT)
    assert await upload_gone(redis, storage, unnamed, PROJECT)


async def test_an_upload_of_content_being_deleted_waits_then_stores_it_again(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    # Retention has claimed it (records gone) and is about to delete the object.
    upload_id, data = await claimed_upload(redis, storage, 60, time.time())
    sending = asyncio.create_task(send(redis, storage, PROJECT, data))
    await asyncio.sleep(0.4)
    assert not sending.done()  # its PUT must not land before the DELETE
    await storage.delete(keys.upload_object(upload_id))
    await redis.zrem(keys.UPLOADS_PURGING, upload_id)
    assert await asyncio.wait_for(sending, 5) == upload_id
    assert await storage.get_bytes(keys.upload_object(upload_id)) == data
    assert await upload_kept(redis, storage, upload_id, PROJECT)


async def test_a_deletion_abandoned_by_a_dead_purge_is_finished_by_the_next(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    upload_id, _ = await claimed_upload(redis, storage, 70, time.time())  # then the purge died
    await purge_expired(redis, storage, retention_settings, time.time())
    assert await upload_gone(redis, storage, upload_id, PROJECT)
    assert not await redis.zrange(keys.UPLOADS_PURGING, 0, -1)


async def test_a_claim_older_than_its_lease_is_taken_back_by_a_new_upload(
    redis: Redis, storage: Storage, retention_settings: Settings
) -> None:
    now = time.time()
    # Claimed by a purge that died longer ago than the lease.
    upload_id, data = await claimed_upload(redis, storage, 80, now - PURGE_LEASE_SECONDS - 1)
    await storage.delete(keys.upload_object(upload_id))  # it may have got as far as the DELETE

    assert await asyncio.wait_for(send(redis, storage, PROJECT, data), 1) == upload_id  # no wait
    assert await redis.zscore(keys.UPLOADS_PURGING, upload_id) is None
    assert await storage.get_bytes(keys.upload_object(upload_id)) == data
    assert await upload_kept(redis, storage, upload_id, PROJECT)
    await purge_expired(redis, storage, retention_settings, now)  # the next purge leaves it alone
    assert await upload_kept(redis, storage, upload_id, PROJECT)
