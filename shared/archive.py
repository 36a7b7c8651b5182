"""Finished jobs' cold records: the config and every image outcome, one object beside the ZIP.

While a job is live its records are in Redis. Once it is final (and packaged), the packager writes
them here and Redis keeps only the job's small summary hash, so Redis holds live state only. The
job store reads an archived job's records from here transparently; a redo brings them back first.
"""

import gzip
import json

from pydantic import BaseModel

from shared import keys
from shared.storage import Storage


class ArchivedRecords(BaseModel):
    """What leaves Redis: the job's config as stored (JSON text) and its images hash as stored
    (slot index -> JSON of an ImageRecord), byte for byte, so a restore puts back what was there."""

    version: int = 1
    job_id: str
    config: str
    images: dict[int, str]


class JobArchive:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def write(self, records: ArchivedRecords) -> None:
        # Gzip: image records are repetitive JSON, a tenth of the size compressed.
        data = gzip.compress(records.model_dump_json().encode(), compresslevel=5)
        await self.storage.put_bytes(keys.archive_object(records.job_id), data, "application/gzip")

    async def read(self, job_id: str) -> ArchivedRecords:
        data = await self.storage.get_bytes(keys.archive_object(job_id))
        return ArchivedRecords.model_validate(json.loads(gzip.decompress(data)))
