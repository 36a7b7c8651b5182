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

from services.packager.zipper import ZipEntry, write_zip
from shared import keys, metrics, planning
from shared.jobstore import ImageRecord, JobRecord, JobStore
from shared.models import ImageStatus, JobStatus
from shared.planning import JobConfig, image_file_name
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)


def _iso(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()


def manifest(job: JobRecord, config: JobConfig, images: dict[int, ImageRecord]) -> dict[str, Any]:
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
                    "created_at": _iso(record.finished_at),
                    "prompt_tokens": record.prompt_tokens,
                    "output_tokens": record.output_tokens,
                }
            )
        else:
            failed.append({**common, "error": record.error, "detail": record.detail})
    return {
        "job_id": job.id,
        "mode": job.mode,
        "group": job.group,
        "created_at": _iso(job.created_at),
        "packaged_at": _iso(time.time()),
        "config": config.model_dump(mode="json"),
        "images_total": job.images_total,
        "images": entries,
        "failed": failed,
    }


def zip_entries(images: dict[int, ImageRecord], manifest_json: bytes) -> Iterator[ZipEntry]:
    for index in sorted(images):
        record = images[index]
        if record.status == ImageStatus.SUCCEEDED and record.object_key:
            yield ZipEntry(
                name=image_file_name(index, record.mime_type),
                object_key=record.object_key,
                modified_at=datetime.fromtimestamp(record.finished_at, UTC),
                # Known from the worker: spares reading each image twice (once for its CRC).
                size=record.bytes if record.crc32 is not None else None,
                crc32=record.crc32 if record.bytes is not None else None,
            )
    yield ZipEntry(
        name="manifest.json", object_key=None, data=manifest_json, modified_at=datetime.now(UTC), compress=True
    )


class Packager:
    def __init__(self, store: JobStore, storage: Storage, settings: Settings) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings

    async def __call__(self, fields: dict[str, str]) -> None:
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
        config, images = await self.store.records(job_id)
        if not any(r.status == ImageStatus.SUCCEEDED for r in images.values()):
            if job.status == JobStatus.PACKAGING:
                reasons = Counter(r.error or "unknown" for r in images.values())
                error = "no image succeeded: " + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
                await self.store.transition(job_id, JobStatus.PACKAGING, JobStatus.FAILED, error=error)
                log.warning("job %s failed: %s", job_id, error)
            return
        started = time.monotonic()
        manifest_json = json.dumps(manifest(job, config, images), indent=2).encode()
        key = keys.zip_object(job_id)
        size = await asyncio.to_thread(
            write_zip, self.storage, key, zip_entries(images, manifest_json), self.settings.zip_part_size
        )
        ending = JobStatus.COMPLETED if job.status == JobStatus.PACKAGING else job.status
        took = time.monotonic() - started
        if await self.store.transition(job_id, job.status, ending, zip_bytes=size):
            metrics.PACKAGING_BYTES.inc(size)
            metrics.PACKAGING_SECONDS.observe(took)
            log.info("job %s packaged: %s bytes in %.2fs", job_id, size, took, extra={"job_id": job_id})
