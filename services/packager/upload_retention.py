"""Retention of uploads and datasets: what nothing has used for BUNCH_RETENTION_DAYS is deleted.

An upload's object is stored once by content and shared by every project that sent the same image,
so it goes only when none of them used it since the cutoff (sent it, or named it in a new job) and
no job or dataset still kept names it. Both ends are fenced in Lua (shared/lua/): a job named
an upload after the scan below moved its last use past the cutoff, so `CLAIM_UPLOAD` leaves it;
once claimed, its records are gone (no new job can name it) and a new upload of the same content
waits for the object's deletion (`USE_UPLOAD`) instead of racing it.
"""

import json
import logging

from redis.asyncio import Redis

from shared import keys, scripts
from shared.scripts import Answer
from shared.storage import Storage

log = logging.getLogger(__name__)

PAGE = 200


async def purge_unused_datasets(redis: Redis, cutoff: float) -> int:
    """Delete datasets no job named since the cutoff (their uploads may then go too)."""
    removed = 0
    while dataset_ids := await redis.zrangebyscore(keys.DATASETS_BY_USE, "-inf", cutoff, start=0, num=PAGE):
        async with redis.pipeline(transaction=True) as pipe:
            for dataset_id in dataset_ids:
                pipe.delete(keys.dataset(dataset_id), keys.dataset_inputs(dataset_id))
            pipe.zrem(keys.DATASETS_BY_USE, *dataset_ids)
            await pipe.execute()
        removed += len(dataset_ids)
    return removed


async def purge_unused_uploads(
    redis: Redis, storage: Storage, cutoff: float, now: float, job_indexes: list[str]
) -> int:
    """Delete the uploads (records and objects) unused since the cutoff; returns how many."""

    async def delete(upload_id: str) -> bool:
        claim_keys = [keys.upload_holders(upload_id), keys.UPLOADS_BY_USE, keys.UPLOADS_PURGING]
        if await scripts.CLAIM_UPLOAD(redis, claim_keys, [upload_id, cutoff, now]) != Answer.DONE:
            return False  # used meanwhile
        await storage.delete(keys.upload_object(upload_id))
        await redis.zrem(keys.UPLOADS_PURGING, upload_id)
        return True

    # A purge that died between the claim and the deletion: finish it (the claim is renewed first).
    for upload_id in await redis.zrange(keys.UPLOADS_PURGING, 0, -1):
        await delete(upload_id)

    named = await _named_by_kept_jobs_and_datasets(redis, job_indexes)
    removed, offset = 0, 0
    while upload_ids := await redis.zrangebyscore(keys.UPLOADS_BY_USE, "-inf", cutoff, start=offset, num=PAGE):
        for upload_id in upload_ids:
            if upload_id in named:
                offset += 1  # stays in the range; the ones deleted or used meanwhile leave it
            elif await delete(upload_id):
                removed += 1
    return removed


async def _named_by_kept_jobs_and_datasets(redis: Redis, job_indexes: list[str]) -> set[str]:
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
    for dataset_id in await redis.zrange(keys.DATASETS_BY_USE, 0, -1):
        named.update(await redis.lrange(keys.dataset_inputs(dataset_id), 0, -1))
    return named
