"""Uploads in Redis: which projects may name an image (keys.upload), who holds it
(keys.upload_holders), when it was last used (keys.UPLOADS_BY_USE) and retention's claims to delete
its object (keys.UPLOADS_PURGING).

An upload's object is stored once by content and shared by every project that sent the same image,
so it goes only when none of them used it since the cutoff (sent it, or named it in a new job) and
no job or dataset still kept names it. Both ends are fenced in Lua (shared/lua/): a job named
an upload after retention's scan moved its last use past the cutoff, so `CLAIM_UPLOAD` leaves it;
once claimed, its records are gone (no new job can name it) and a new upload of the same content
waits for the object's deletion (`USE_UPLOAD`) instead of racing it.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis.asyncio import Redis

from shared import keys, scripts
from shared.errors import Unavailable
from shared.scripts import Answer

# How long retention's claim to delete an upload's object holds off a new upload of the same content.
PURGE_LEASE_SECONDS = 600
RETENTION_WAIT_TRIES, RETENTION_WAIT_SECONDS = 50, 0.1
PAGE = 200


class UploadStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def use(self, upload_id: str) -> bool:
        """Note that the upload is used now, once retention is not deleting it; True if its object
        must be stored again (retention had claimed it)."""
        indexes = [keys.UPLOADS_BY_USE, keys.UPLOADS_PURGING]
        for _ in range(RETENTION_WAIT_TRIES):
            reply = await scripts.USE_UPLOAD(self.redis, indexes, [upload_id, time.time(), PURGE_LEASE_SECONDS])
            if reply.answer != Answer.REFUSED:
                return reply.answer == Answer.RECLAIMED
            await asyncio.sleep(RETENTION_WAIT_SECONDS)  # a single object's deletion: milliseconds
        raise Unavailable("This image is being removed by retention right now; send it again in a minute.")

    async def record(self, project: str, upload_id: str, info: dict[str, Any]) -> None:
        """Let `project` name the upload, with what it was told about it."""
        record = keys.upload(project, upload_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(record, json.dumps(info))
            pipe.sadd(keys.upload_holders(upload_id), record)
            await pipe.execute()

    async def claim_for_deletion(self, upload_id: str, cutoff: float, now: float) -> bool:
        """Retention's claim to delete the upload: its records go now; False if it was used since."""
        claim_keys = [keys.upload_holders(upload_id), keys.UPLOADS_BY_USE, keys.UPLOADS_PURGING]
        return (await scripts.CLAIM_UPLOAD(self.redis, claim_keys, [upload_id, cutoff, now])).answer == Answer.DONE

    async def deleted(self, upload_id: str) -> None:
        """The claimed upload's object is gone."""
        await self.redis.zrem(keys.UPLOADS_PURGING, upload_id)

    async def claimed(self) -> list[str]:
        """Uploads claimed for deletion whose deletion did not finish (a retention pass died)."""
        return list(await self.redis.zrange(keys.UPLOADS_PURGING, 0, -1))

    async def unused_since(self, cutoff: float, skip: Iterable[str]) -> AsyncIterator[str]:
        """Uploads last used before the cutoff, except those in `skip`, oldest first. Those the caller
        deletes (or that are used meanwhile) leave the range as it goes."""
        skipped, offset = set(skip), 0
        while ids := await self.redis.zrangebyscore(keys.UPLOADS_BY_USE, "-inf", cutoff, start=offset, num=PAGE):
            for upload_id in ids:
                if upload_id in skipped:
                    offset += 1
                else:
                    yield upload_id
