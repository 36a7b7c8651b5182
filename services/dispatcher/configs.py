"""Parsed job configs by job id, for the dispatcher's hot paths."""

from collections import OrderedDict

from shared.planning import JobConfig
from shared.stores.jobs import JobStore


class ConfigCache:
    """Parsed job configs by job id. A cache only: the config of record stays in Redis."""

    def __init__(self, store: JobStore, size: int = 256) -> None:
        self.store = store
        self.size = size
        self._items: OrderedDict[str, JobConfig] = OrderedDict()

    async def get(self, job_id: str) -> JobConfig:
        if job_id in self._items:
            self._items.move_to_end(job_id)
            return self._items[job_id]
        config = await self.store.config(job_id)
        self._items[job_id] = config
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return config
