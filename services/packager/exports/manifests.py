"""A job's manifest at an export's destination: the same content as the manifest.json of its ZIP.

Up to settings.export_manifest_json_max_images images it is that manifest.json; beyond, it is
manifest.jsonl, written a page of records at a time into a spooled file (memory stays at one page,
whatever the job's size): a first line with the job's fields ("kind": "job", the ZIP manifest
without its lists), then one line per image ("kind": "image", or "failed" for a slot without one).

Its `packaged_at` is when the job ended, not the moment it is written: the manifest of a resumed or
repeated export comes out byte for byte the same, so the copy already there is recognised (a job
that changed since, by a redo, ended again later and its manifest is written anew).
"""

import json
import tempfile
from dataclasses import dataclass
from typing import IO, Any

from services.packager.packaging import image_entries, manifest
from shared import checksums
from shared.stores.jobs import JobStore
from shared.stores.records import JobRecord
from shared.times import iso

PAGE = 256  # image records read per Redis call
SPOOL_BYTES = 1024 * 1024  # a JSONL manifest stays in memory up to this size, then moves to a file


@dataclass
class ManifestFile:
    data: IO[bytes]
    size: int
    crc32: int
    jsonl: bool


class _Writer:
    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.size = 0
        self.crc = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)
        self.crc = checksums.crc32(data, self.crc)

    def done(self, jsonl: bool) -> ManifestFile:
        self.file.seek(0)
        return ManifestFile(self.file, self.size, self.crc, jsonl)


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def job_manifest(store: JobStore, job: JobRecord, max_json_images: int, file_prefix: str = "") -> ManifestFile:
    """The job's manifest; `file_prefix` goes before each image's file name (the flat layout's
    "<job_id>-"), so `file` always names the object beside the manifest."""
    writer = _Writer()
    packaged_at = iso(job.completed_at or job.created_at)
    if job.images_total <= max_json_images:
        config, images = await store.records(job.id)
        content = manifest(job, config, images)
        content["packaged_at"] = packaged_at
        for entry in content["images"]:
            entry["file"] = file_prefix + entry["file"]
        writer.write(json.dumps(content, indent=2, ensure_ascii=False).encode())
        return writer.done(jsonl=False)
    config, _ = await store.records_page(job.id, 0, 0)
    header = manifest(job, config, {})
    header["packaged_at"] = packaged_at
    del header["images"], header["failed"]
    writer.write(_line({"kind": "job", **header}))
    for start in range(0, job.images_total, PAGE):
        config, images = await store.records_page(job.id, start, PAGE)
        entries, failed = image_entries(config, images)
        by_index = sorted([(e["index"], "image", e) for e in entries] + [(e["index"], "failed", e) for e in failed])
        for _, kind, entry in by_index:
            if kind == "image":
                entry["file"] = file_prefix + entry["file"]
            writer.write(_line({"kind": kind, **entry}))
    return writer.done(jsonl=True)
