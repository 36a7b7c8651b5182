"""Retention of uploads and datasets: what nothing has used for BUNCH_RETENTION_DAYS is deleted.

How the deletion of an upload's object is fenced against a job or an upload that uses it at the
same moment is said in shared/stores/uploads.py.
"""

import json

from redis.asyncio import Redis

from shared import keys
from shared.storage import Storage
from shared.stores.datasets import DatasetStore
from shared.stores.uploads import UploadStore

PAGE = 200


async def purge_unused_datasets(redis: Redis, cutoff: float) -> int:
    """Delete datasets no job named since the cutoff (their uploads may then go too)."""
    return await DatasetStore(redis).purge_unused(cutoff)


async def purge_unused_uploads(
    redis: Redis, storage: Storage, cutoff: float, now: float, job_indexes: list[str]
) -> int:
    """Delete the uploads (records and objects) unused since the cutoff; returns how many."""
    uploads = UploadStore(redis)

    async def delete(upload_id: str) -> bool:
        if not await uploads.claim_for_deletion(upload_id, cutoff, now):
            return False  # used meanwhile
        await storage.delete(keys.upload_object(upload_id))
        await uploads.deleted(upload_id)
        return True

    # A purge that died between the claim and the deletion: finish it (the claim is renewed first).
    for upload_id in await uploads.claimed():
        await delete(upload_id)

    named = await _named_by_kept_jobs(redis, job_indexes) | await DatasetStore(redis).all_input_ids()
    removed = 0
    async for upload_id in uploads.unused_since(cutoff, skip=named):
        removed += await delete(upload_id)
    return removed


async def _named_by_kept_jobs(redis: Redis, job_indexes: list[str]) -> set[str]:
    named: set[str] = set()
    for jobs_index in job_indexes:
        start = 0
        while job_ids := await redis.zrange(jobs_index, start, start + PAGE - 1):
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(keys.job(job_id), "config")
                configs = await pipe.execute()
            for raw in configs:
                if raw:
                    config = json.loads(raw)
                    named.update(config.get("reference_ids") or (), config.get("input_ids") or ())
            start += PAGE
    return named
