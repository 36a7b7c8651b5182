"""The packager's SIGTERM: a ZIP under way has the grace period to finish, then gives up cleanly
(no object, no multipart upload left behind) and its job waits for another replica."""

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from minio.error import S3Error
from redis.asyncio import Redis

from services.packager.packaging import Packager
from services.packager.shutdown import ZipWriters
from services.packager.zipper import ZipAbandoned, ZipEntry, write_zip
from shared.archive import JobArchive
from shared.models import JobStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from tests.security.test_forged_results import packaging_job
from tests.stack_helpers import png_bytes

PART = 5 * 1024 * 1024
NOW = datetime(2026, 12, 2, tzinfo=UTC)


def _uploads_in_progress(storage: Storage, key: str) -> list[str]:
    # minio's own listing call (ListMultipartUploads), as an operator's `mc ls --incomplete` would.
    result = storage.client._list_multipart_uploads(storage.bucket, prefix=key)
    return [upload.object_name for upload in result.uploads]


async def test_an_abandoned_zip_leaves_no_object_and_no_upload(storage: Storage) -> None:
    abandon = threading.Event()
    key = "shutdown/abandoned.zip"

    def entries() -> Iterator[ZipEntry]:
        # Incompressible and over one part: the first part is uploaded before the writer gives up.
        yield ZipEntry(name="a.bin", data=os.urandom(PART + 1024), modified_at=NOW)
        abandon.set()
        yield ZipEntry(name="b.bin", data=os.urandom(PART), modified_at=NOW)

    with pytest.raises(ZipAbandoned):
        await asyncio.to_thread(write_zip, storage, key, entries(), PART, abandon)
    assert not await storage.exists(key)
    assert _uploads_in_progress(storage, key) == []


async def test_without_the_signal_the_same_zip_is_written(storage: Storage) -> None:
    key = "shutdown/kept.zip"
    entries = [ZipEntry(name=f"{n}.bin", data=os.urandom(PART), modified_at=NOW) for n in range(2)]
    size = await asyncio.to_thread(write_zip, storage, key, entries, PART, threading.Event())
    assert size > 2 * PART and await storage.size(key) == size


async def test_a_zip_that_ends_within_the_grace_is_not_abandoned() -> None:
    writers, stop = ZipWriters(), asyncio.Event()
    wind_down = asyncio.create_task(writers.wind_down(stop, grace_seconds=60))
    seen_abandoned = []

    async def one_zip() -> None:
        with writers.writing() as abandon:
            await asyncio.sleep(0.3)
            seen_abandoned.append(abandon.is_set())

    zip_task = asyncio.create_task(one_zip())
    await asyncio.sleep(0.05)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(wind_down, 30)
    await zip_task
    assert seen_abandoned == [False]
    assert time.monotonic() - started < 30  # it ended with the ZIP, not with the 60 s grace
    # A ZIP that starts after the stop (read just before it) gives up at once.
    with writers.writing() as abandon:
        assert abandon.is_set()


async def test_a_zip_past_the_grace_is_abandoned() -> None:
    writers, stop = ZipWriters(), asyncio.Event()
    wind_down = asyncio.create_task(writers.wind_down(stop, grace_seconds=0.2))
    with writers.writing() as abandon:
        stop.set()
        await asyncio.wait_for(wind_down, 30)
        assert abandon.is_set()


def test_listing_uploads_sees_an_unfinished_one(storage: Storage) -> None:
    """The check above can fail: a multipart upload left open is listed."""
    key = "shutdown/open.bin"
    upload_id = storage.client._create_multipart_upload(storage.bucket, key, {})
    try:
        assert _uploads_in_progress(storage, key) == [key]
    finally:
        storage.client._abort_multipart_upload(storage.bucket, key, upload_id)
    with pytest.raises(S3Error):
        storage.client._abort_multipart_upload(storage.bucket, key, upload_id)


async def test_a_sigterm_while_a_jobs_records_are_read_waits_for_its_zip(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    """The stop comes after the packaging message was taken and before the ZIP's first byte (the
    job's records being read: long for a large archived job, or under load). The job counts as
    work under way from its message on, so it is zipped within the grace, not abandoned."""
    store = JobStore(fresh_redis, settings, JobArchive(storage))
    job_id, _ = await packaging_job(store, storage, {index: png_bytes(seed=40 + index) for index in range(4)})
    writers, stop = ZipWriters(), asyncio.Event()
    wind_down = asyncio.create_task(writers.wind_down(stop, grace_seconds=30))
    packager = Packager(store, storage, settings, writers)

    handled = asyncio.create_task(packager({"job_id": job_id}))
    await asyncio.sleep(0)  # the handler has started: it reads the job, no ZIP is under way yet
    stop.set()
    await asyncio.wait_for(handled, 30)
    await asyncio.wait_for(wind_down, 30)
    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.COMPLETED, job
