"""Finished jobs' cold records: the config and every image outcome, one object beside the ZIP.

While a job is live its records are in Redis. Once it is final (and packaged), the packager writes
them here and Redis keeps only the job's small summary hash, so Redis holds live state only. The
job store reads an archived job's records from here transparently; a redo brings them back first.
"""

import gzip
import json
from typing import Any

from pydantic import BaseModel

from shared import keys
from shared.storage import Storage

CHUNK_SLOTS = 1000  # image slots per chunk object: a page of results reads at most two
GZIP = "application/gzip"


class ArchivedRecords(BaseModel):
    """What leaves Redis: the job's config as stored (JSON text) and its images hash as stored
    (slot index -> JSON of an ImageRecord), byte for byte, so a restore puts back what was there."""

    version: int = 1
    job_id: str
    config: str
    images: dict[int, str]


class ArchiveHead(BaseModel):
    """The archive object itself: the config, and which chunks of CHUNK_SLOTS slots hold records.
    Version 1 archives (before chunks) hold every record here, in `images`."""

    version: int
    job_id: str
    config: str
    chunks: list[int] = []
    images: dict[int, str] = {}


def _pack(value: object) -> bytes:
    # Gzip: image records are repetitive JSON, a tenth of the size compressed.
    return gzip.compress(json.dumps(value, separators=(",", ":")).encode(), compresslevel=5)


def _unpack(data: bytes) -> Any:
    return json.loads(gzip.decompress(data))


class JobArchive:
    """A job's records in chunks of CHUNK_SLOTS slots beside one head object, so a page of a huge
    finished job reads the head and one or two chunks, never the whole job."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def write(self, records: ArchivedRecords) -> None:
        chunks: dict[int, dict[int, str]] = {}
        for index, record in records.images.items():
            chunks.setdefault(index // CHUNK_SLOTS, {})[index] = record
        for chunk, images in sorted(chunks.items()):
            await self.storage.put_bytes(keys.archive_chunk(records.job_id, chunk), _pack(images), GZIP)
        # Last: a reader starts from the head, so it never names a chunk not written yet.
        head = ArchiveHead(version=2, job_id=records.job_id, config=records.config, chunks=sorted(chunks))
        await self.storage.put_bytes(keys.archive_object(records.job_id), _pack(head.model_dump()), GZIP)

    async def head(self, job_id: str) -> ArchiveHead:
        return ArchiveHead.model_validate(_unpack(await self.storage.get_bytes(keys.archive_object(job_id))))

    async def read(self, job_id: str) -> ArchivedRecords:
        """Every record (a restore, a ZIP): the head and every chunk."""
        head = await self.head(job_id)
        images = dict(head.images)
        for chunk in head.chunks:
            images.update(await self._chunk(job_id, chunk))
        return ArchivedRecords(job_id=job_id, config=head.config, images=images)

    async def read_page(self, job_id: str, start: int, count: int) -> ArchivedRecords:
        """The config and the records of slots start..start+count-1 only."""
        head = await self.head(job_id)
        wanted = range(start, start + count)
        images = {index: record for index, record in head.images.items() if index in wanted}
        stored = set(head.chunks)
        for chunk in range(start // CHUNK_SLOTS, (start + count - 1) // CHUNK_SLOTS + 1):
            if chunk in stored:
                images.update((i, r) for i, r in (await self._chunk(job_id, chunk)).items() if i in wanted)
        return ArchivedRecords(job_id=job_id, config=head.config, images=images)

    async def _chunk(self, job_id: str, chunk: int) -> dict[int, str]:
        raw = _unpack(await self.storage.get_bytes(keys.archive_chunk(job_id, chunk)))
        return {int(index): record for index, record in raw.items()}
