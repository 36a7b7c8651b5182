"""Downloads of whole groups: one ZIP with a folder per group, or a direct link to a single image.

The gateway records a download (`create_download`) and publishes it on DOWNLOADS_STREAM; the
packager's `DownloadBuilder` builds it. Both read the record through `DownloadRecord`.
"""

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from minio.error import S3Error
from redis.asyncio import Redis

from services.packager.shutdown import ZipWriters
from services.packager.zipper import ZipEntry, safe_zip_path, truncate_utf8, write_zip
from shared import keys, planning
from shared.errors import Invalid
from shared.models import ImageStatus
from shared.planning import image_file_name
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.downloads import FINAL_DOWNLOAD_STATUSES, DownloadRecord, DownloadStatus, DownloadStore
from shared.stores.groups import GroupStore
from shared.stores.jobs import JobStore
from shared.stores.records import ImageRecord
from shared.times import iso, utc

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # deliveries that crashed mid-build before the download is marked failed
MANIFEST = "manifest.json"
# Longest group-name part of a folder that needs the group id appended to be unique.
_DISAMBIGUATED_NAME_CHARS = 60


@dataclass(frozen=True, slots=True)
class _Image:
    path: str  # inside the ZIP
    job_id: str
    index: int
    record: ImageRecord
    prompt: str
    reference_ids: tuple[str, ...]
    input_id: str | None


@dataclass
class _Folder:
    group_id: str
    name: str
    path: str
    job_ids: list[str] = field(default_factory=list)
    images: list[_Image] = field(default_factory=list)


class _Unbuildable(Invalid):
    """The download can never be built as asked: fail it instead of retrying."""


def folder_path(name: str, group_id: str, taken: set[str]) -> str:
    """A safe folder name for the group, unique among `taken` (compared case-insensitively, since
    Windows and macOS extract "Cats" and "cats" into the same folder)."""
    path = safe_zip_path(name)
    if path.casefold() in taken:
        # Cut the name, not the id: the id is what makes the folder unique.
        path = safe_zip_path(f"{truncate_utf8(path[:_DISAMBIGUATED_NAME_CHARS], 200)} {group_id}")
    taken.add(path.casefold())
    return path


def manifest(record: DownloadRecord, folders: list[_Folder], missing: list[str]) -> dict[str, Any]:
    return {
        "download_id": record.id,
        "created_at": iso(record.created_at),
        "packaged_at": iso(time.time()),
        "groups": [
            {
                "id": folder.group_id,
                "name": folder.name,
                "folder": folder.path,
                "job_ids": folder.job_ids,
                "images": [
                    {
                        "file": image.path,
                        "job_id": image.job_id,
                        "index": image.index,
                        "prompt": image.prompt,
                        "reference_ids": list(image.reference_ids),
                        "input_id": image.input_id,
                        "attempt": image.record.attempt,
                        "created_at": iso(image.record.finished_at),
                    }
                    for image in folder.images
                ],
            }
            for folder in folders
        ],
        # Groups deleted between the request and the build.
        "missing_group_ids": missing,
    }


def zip_entries(folders: list[_Folder], manifest_json: bytes) -> Iterator[ZipEntry]:
    for folder in folders:
        for image in folder.images:
            record = image.record
            assert record.object_key is not None
            known = record.bytes is not None and record.crc32 is not None
            yield ZipEntry(
                name=image.path,
                object_key=record.object_key,
                modified_at=utc(record.finished_at),
                size=record.bytes if known else None,
                crc32=record.crc32 if known else None,
            )
    yield ZipEntry(name=MANIFEST, data=manifest_json, modified_at=datetime.now(UTC), compress=True)


class DownloadBuilder:
    def __init__(
        self, redis: Redis, store: JobStore, storage: Storage, settings: Settings, writers: ZipWriters | None = None
    ) -> None:
        self.redis = redis
        self.writers = writers or ZipWriters()
        self.store = store
        self.storage = storage
        self.settings = settings
        self.downloads = DownloadStore(redis)
        self.groups = GroupStore(redis)

    async def __call__(self, fields: dict[str, str]) -> None:
        # Counted from the message on, not from the ZIP's first byte: a SIGTERM while its groups are
        # read waits for it too (services/packager/shutdown.py).
        with self.writers.writing():
            await self.build(fields["download_id"])

    async def build(self, download_id: str) -> None:
        record = await self.downloads.find(download_id)
        if record is None or record.status in FINAL_DOWNLOAD_STATUSES:
            return  # purged, or built already (a redelivered message)
        if await self.downloads.start_building(download_id) > MAX_ATTEMPTS:
            await self._finish(download_id, DownloadStatus.FAILED, error=f"gave up after {MAX_ATTEMPTS} attempts")
            return
        started = time.monotonic()
        try:
            await self._build(record)
        except _Unbuildable as exc:
            await self._finish(download_id, DownloadStatus.FAILED, error=str(exc))
            log.warning("download %s failed: %s", download_id, exc)
            return
        log.info("download %s built in %.2fs", download_id, time.monotonic() - started)

    async def _build(self, record: DownloadRecord) -> None:
        folders, missing = await self._collect(record)
        images = [image for folder in folders for image in folder.images]
        if not images:
            raise _Unbuildable("the groups have no succeeded images")
        if len(images) == 1:
            image = images[0]
            await self._finish(
                record.id,
                DownloadStatus.READY,
                image_count=1,
                single_key=image.record.object_key,
                # The file's own name, not the folder: Content-Disposition is safest in ASCII.
                single_name=image.path.rsplit("/", 1)[1],
            )
            return
        manifest_json = json.dumps(manifest(record, folders, missing), indent=2, ensure_ascii=False).encode()
        zip_key = keys.download_object(record.id)
        entries = zip_entries(folders, manifest_json)
        try:
            with self.writers.writing() as abandon:
                size = await asyncio.to_thread(
                    write_zip, self.storage, zip_key, entries, self.settings.zip_part_size, abandon
                )
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject"}:  # an image was purged by retention meanwhile
                raise _Unbuildable(f"an image is no longer stored ({exc.resource})") from None
            raise
        await self._finish(record.id, DownloadStatus.READY, image_count=len(images), zip_key=zip_key, zip_bytes=size)

    async def _collect(self, record: DownloadRecord) -> tuple[list[_Folder], list[str]]:
        taken = {MANIFEST.casefold()}  # a group named "manifest.json" must not shadow the manifest
        folders, missing = [], []
        for group_id in record.group_ids:
            group = await self.groups.find(record.project, group_id)
            if group is None:
                missing.append(group_id)
                continue
            folder = _Folder(group_id, group.name, folder_path(group.name, group_id, taken))
            for job_id in await self.groups.job_ids(group_id):
                folder.job_ids.append(job_id)
                folder.images += await self._job_images(job_id, folder.path)
            folders.append(folder)
        return folders, missing

    async def _job_images(self, job_id: str, folder: str) -> list[_Image]:
        try:
            config, records = await self.store.records(job_id)
        except KeyError:
            return []  # purged by retention
        images = []
        for index in sorted(records):
            record = records[index]
            if record.status != ImageStatus.SUCCEEDED or not record.object_key:
                continue
            slot = planning.slot(config, index)
            path = f"{folder}/{job_id}-{image_file_name(index, record.mime_type)}"
            images.append(_Image(path, job_id, index, record, slot.prompt, slot.reference_ids, slot.input_id))
        return images

    async def _finish(self, download_id: str, status: DownloadStatus, **fields: Any) -> None:
        await self.downloads.finish(download_id, status, **fields)
