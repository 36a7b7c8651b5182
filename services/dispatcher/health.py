"""RunPod's /health, read every `runpod_health_interval_seconds` and kept in Redis for
/api/queue/stats and the console: the only place that shows throttled, unhealthy or missing
workers and RunPod's own queue (docs.runpod.io/serverless/endpoints/operations, "/health").
"""

import asyncio
import contextlib
import logging

from services.dispatcher.runpod_client import RunPodClient, RunPodError
from shared import metrics
from shared.redis_connection import REDIS_DOWN
from shared.stores.upstream import UpstreamStore

log = logging.getLogger(__name__)


class HealthReader:
    def __init__(self, runpod: RunPodClient, upstream: UpstreamStore, interval_seconds: float) -> None:
        self.runpod = runpod
        self.upstream = upstream
        self.interval = interval_seconds

    async def run(self, stop: asyncio.Event) -> None:
        if self.interval <= 0:
            return
        while not stop.is_set():
            await self.read_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def read_once(self) -> None:
        try:
            figures = await self.runpod.health()
            await self.upstream.record_health(figures, self.interval)
        except RunPodError as exc:
            metrics.RUNPOD_ERRORS.labels(f"health_{exc.status or 'unreachable'}").inc()
            if exc.refused:
                metrics.RUNPOD_REFUSED.labels("health").inc()
            log.warning("RunPod /health unavailable: %s", exc)
        except REDIS_DOWN as exc:
            log.warning("could not keep RunPod's health figures: redis unavailable (%s)", exc)
