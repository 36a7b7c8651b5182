"""Datasets in Redis: the ordered inputs of automatic jobs, uploaded at once (keys.dataset,
keys.dataset_inputs), and when a job last named each one (keys.DATASETS_BY_USE, for retention)."""

import time
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis

from shared import keys
from shared.errors import NotFound
from shared.ids import is_id

NOT_FOUND = "No such dataset in this project."
PURGE_PAGE = 200


@dataclass(frozen=True, slots=True)
class Dataset:
    id: str
    count: int
    created_at: float


class DatasetStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def save(self, project: str, upload_ids: list[str]) -> Dataset:
        dataset = Dataset(uuid.uuid4().hex, len(upload_ids), time.time())
        async with self.redis.pipeline(transaction=True) as pipe:
            fields = {"id": dataset.id, "project": project, "count": dataset.count, "created_at": dataset.created_at}
            pipe.hset(keys.dataset(dataset.id), mapping=fields)
            pipe.rpush(keys.dataset_inputs(dataset.id), *upload_ids)
            pipe.zadd(keys.DATASETS_BY_USE, {dataset.id: dataset.created_at})
            await pipe.execute()
        return dataset

    async def get(self, project: str, dataset_id: str) -> Dataset:
        # A malformed id is answered like an unknown one, before it can name another key (`<id>:inputs`).
        raw = await self.redis.hgetall(keys.dataset(dataset_id)) if is_id(dataset_id) else {}
        if not raw or raw.get("project") != project:
            raise NotFound(NOT_FOUND)
        return Dataset(dataset_id, int(raw["count"]), float(raw["created_at"]))

    async def input_ids(self, project: str, dataset_id: str) -> list[str] | None:
        """The dataset's upload ids in archive order; None if it is unknown or another project's (or the
        id could not be one of ours: it never reaches Redis, where it could name another key)."""
        if not is_id(dataset_id) or await self.redis.hget(keys.dataset(dataset_id), "project") != project:
            return None
        return list(await self.redis.lrange(keys.dataset_inputs(dataset_id), 0, -1))

    async def purge_unused(self, cutoff: float) -> int:
        """Delete datasets no job named since the cutoff (their uploads may then go too)."""
        removed = 0
        while ids := await self.redis.zrangebyscore(keys.DATASETS_BY_USE, "-inf", cutoff, start=0, num=PURGE_PAGE):
            async with self.redis.pipeline(transaction=True) as pipe:
                for dataset_id in ids:
                    pipe.delete(keys.dataset(dataset_id), keys.dataset_inputs(dataset_id))
                pipe.zrem(keys.DATASETS_BY_USE, *ids)
                await pipe.execute()
            removed += len(ids)
        return removed

    async def all_input_ids(self) -> set[str]:
        """Every upload a kept dataset names (retention keeps those)."""
        named: set[str] = set()
        for dataset_id in await self.redis.zrange(keys.DATASETS_BY_USE, 0, -1):
            named.update(await self.redis.lrange(keys.dataset_inputs(dataset_id), 0, -1))
        return named
