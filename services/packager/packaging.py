"""Build a finished job's ZIP (images + manifest.json) in object storage, complete the job, and
archive its records beside the ZIP (Redis keeps live state only)."""

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from minio.error import S3Error
from redis.exceptions import WatchError

from services.packager.shutdown import ZipWriters
from services.packager.zipper import ObjectMismatch, ZipEntry, write_zip
from shared import keys, metrics, planning
from shared.models import ImageStatus, JobStatus
from shared.planning import JobConfig, image_file_name
from shared.settings import Settings
from shared.storage import MISSING, Storage
from shared.stores.jobs import JobStore
from shared.stores.records import ImageRecord, JobRecord
from shared.times import iso, utc

log = logging.getLogger(__name__)

# The error of an image whose stored object turned out missing or changed (as the dispatcher's).
OBJECT_MISMATCH = "object_mismatch"
# Objects looked at (HEAD) at once when one turned out unusable.
VERIFY_CONCURRENCY = 8


def manifest(job: JobRecord, config: JobConfig, images: dict[int, ImageRecord]) -> dict[str, Any]:
    entries, failed = image_entries(config, images)
    return {
        "job_id": job.id,
        "mode": job.mode,
        "group": job.group,
        "created_at": iso(job.created_at),
        "packaged_at": iso(time.time()),
        "config": config.model_dump(mode="json"),
        "images_total": job.images_total,
        "images": entries,
        "failed": failed,
        # What its runs cost, as recorded when each ended (the API's `cost`).
        "cost": job.cost(),
    }


def image_entries(
    config: JobConfig, images: dict[int, ImageRecord]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's entries of `images`: those that succeeded, and those that failed."""
    entries, failed = [], []
    for index in sorted(images):
        record, slot = images[index], planning.slot(config, index)
        common = {
            "index": index,
            "prompt": slot.prompt,
            "reference_ids": list(slot.reference_ids),
            "input_id": slot.input_id,
            "attempt": record.attempt,
        }
        if record.status == ImageStatus.SUCCEEDED:
            entries.append(
                {
                    "file": image_file_name(index, record.mime_type),
                    **common,
                    "created_at": iso(record.finished_at),
                    "prompt_tokens": record.prompt_tokens,
                    "output_tokens": record.output_tokens,
                }
            )
        else:
            failed.append({**common, "error": record.error, "detail": record.detail})
    return entries, failed


def zip_entries(images: dict[int, ImageRecord], manifest_json: bytes) -> Iterator[ZipEntry]:
    for index in sorted(images):
        record = images[index]
        if record.status == ImageStatus.SUCCEEDED and record.object_key:
            yield ZipEntry(
                name=image_file_name(index, record.mime_type),
                object_key=record.object_key,
                modified_at=utc(record.finished_at),
                # Known from the worker: spares reading each image twice (once for its CRC).
                size=record.bytes if record.crc32 is not None else None,
                crc32=record.crc32 if record.bytes is not None else None,
            )
    yield ZipEntry(
        name="manifest.json", object_key=None, data=manifest_json, modified_at=datetime.now(UTC), compress=True
    )


class Packager:
    def __init__(
        self, store: JobStore, storage: Storage, settings: Settings, writers: ZipWriters | None = None
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.writers = writers or ZipWriters()

    async def __call__(self, fields: dict[str, str]) -> None:
        # Counted from the message on, not from the ZIP's first byte: a SIGTERM while the job's
        # records are read (seconds for a large archived job, longer under load) waits for it too,
        # instead of finding no ZIP under way and abandoning the one about to start.
        with self.writers.writing():
            await self.package(fields["job_id"])

    async def package(self, job_id: str) -> None:
        job = await self.store.get(job_id)
        if job is None:
            return
        # A canceled job is packaged too (what succeeded stays downloadable) but stays canceled.
        if job.status == JobStatus.PACKAGING or (
            job.status == JobStatus.CANCELED and job.zip_key is None and job.images_succeeded > 0
        ):
            await self.build_zip(job)
        # Also for a message delivered again after a crash between the two steps; a job reopened
        # meanwhile (a redo) is not final and stays hot.
        if await self.store.archive_job(job_id):
            log.info("job %s archived", job_id, extra={"job_id": job_id})

    async def build_zip(self, job: JobRecord) -> None:
        job_id = job.id
        started = time.monotonic()
        # Each pass that meets an unusable object fails that image and starts over: the loop ends.
        while True:
            config, images = await self.store.records(job_id)
            if not any(r.status == ImageStatus.SUCCEEDED for r in images.values()):
                if job.status == JobStatus.PACKAGING:
                    reasons = Counter(r.error or "unknown" for r in images.values())
                    error = "no image succeeded: " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
                    await self.store.transition(job_id, JobStatus.PACKAGING, JobStatus.FAILED, error=error)
                    log.warning("job %s failed: %s", job_id, error)
                return
            manifest_json = json.dumps(manifest(job, config, images), indent=2).encode()
            key = keys.zip_object(job_id)
            entries = zip_entries(images, manifest_json)
            try:
                with self.writers.writing() as abandon:
                    size = await asyncio.to_thread(
                        write_zip, self.storage, key, entries, self.settings.zip_part_size, abandon
                    )
                break
            except ObjectMismatch as exc:
                unusable = {exc.object_key: exc.detail}
            except S3Error as exc:
                if exc.code not in MISSING or not exc.object_name:
                    raise  # not about one image (storage unavailable...): the message is delivered again
                unusable = {exc.object_name: "no image is stored for it any more"}
            if not await self.set_aside(job, images, unusable):
                raise RuntimeError(f"job {job_id}: an object of no succeeded image failed its ZIP: {unusable}")
        ending = JobStatus.COMPLETED if job.status == JobStatus.PACKAGING else job.status
        took = time.monotonic() - started
        if await self.store.transition(job_id, job.status, ending, zip_bytes=size):
            metrics.PACKAGING_BYTES.inc(size)
            metrics.PACKAGING_SECONDS.observe(took)
            log.info("job %s packaged: %s bytes in %.2fs", job_id, size, took, extra={"job_id": job_id})

    async def set_aside(self, job: JobRecord, images: dict[int, ImageRecord], unusable: dict[str, str]) -> int:
        """Fail the succeeded images whose objects are unusable (deleted, corrupted since they were
        checked), so the rest can be packaged instead of the job waiting in packaging for good.

        One bad object suggests more (a deleted prefix): every other one is looked at too, a HEAD
        each, so a pass fails all the missing ones at once (a changed CRC needs the bytes: the next
        ZIP attempt finds those). Returns the images failed by this call."""
        by_key = {r.object_key: i for i, r in images.items() if r.status == ImageStatus.SUCCEEDED and r.object_key}
        gate = asyncio.Semaphore(VERIFY_CONCURRENCY)

        async def look(key: str, record: ImageRecord) -> tuple[str, str | None]:
            async with gate:
                size = await self.storage.size(key)
            if size is None:
                return key, "no image is stored for it any more"
            if size != record.bytes and record.bytes is not None:
                return key, f"the stored image has {size} bytes, {record.bytes} were recorded"
            return key, None

        others = [look(k, images[i]) for k, i in by_key.items() if k not in unusable]
        unusable |= {key: detail for key, detail in await asyncio.gather(*others) if detail is not None}
        failed = 0
        for key, detail in unusable.items():
            index = by_key.get(key)
            if index is not None and await self._fail_image(job, index, f"at packaging: {detail}"):
                failed += 1
                log.warning("job %s image %s set aside: %s", job.id, index, detail, extra={"job_id": job.id})
        return failed

    async def _fail_image(self, job: JobRecord, index: int, detail: str) -> bool:
        """Turn one succeeded image into a failed one, its counts with it; False if it was not succeeded."""
        redis, images_key, field = self.store.redis, keys.job_images(job.id), str(index)
        async with redis.pipeline(transaction=True) as pipe:
            for _ in range(10):
                try:
                    await pipe.watch(images_key)
                    raw = await pipe.hget(images_key, field)
                    record = ImageRecord.model_validate_json(raw) if raw else None
                    if record is None or record.status != ImageStatus.SUCCEEDED:
                        await pipe.reset()
                        return False
                    failed = record.model_copy(
                        update={"status": ImageStatus.FAILED, "error": OBJECT_MISMATCH, "detail": detail}
                        | dict.fromkeys(("object_key", "mime_type", "bytes", "crc32"))
                    )
                    hourly, hour = keys.project_hourly(job.project), int(record.finished_at // 3600)
                    # The hour's figures may have been pruned since: never take one below zero.
                    counted = int(await pipe.hget(hourly, f"{hour}:succeeded") or 0) > 0
                    pipe.multi()
                    pipe.hset(images_key, field, failed.model_dump_json(exclude_none=True))
                    pipe.hincrby(keys.job(job.id), "images_succeeded", -1)
                    pipe.hincrby(keys.job(job.id), "images_failed", 1)
                    if counted:
                        pipe.hincrby(hourly, f"{hour}:succeeded", -1)
                        pipe.hincrby(hourly, f"{hour}:failed", 1)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        raise RuntimeError(f"job {job.id} image {index}: its record kept changing")
