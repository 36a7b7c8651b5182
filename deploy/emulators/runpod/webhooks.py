"""Webhook delivery as RunPod does it (https://docs.runpod.io/serverless/endpoints/send-requests,
"Webhooks"): a POST of the /status body plus `input` and `webhook` when a job ends, FAILED included;
anything but a 200 is retried twice, 10 s apart; no signature, no custom headers (runpod-python#413).
The faults drop, duplicate and delay deliveries."""

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout

from deploy.emulators.runpod.model import Config, Counters, Faults, Job

log = logging.getLogger("emulator.runpod")

WEBHOOK_ATTEMPTS = 3  # the first POST plus RunPod's 2 retries
WEBHOOK_TIMEOUT = ClientTimeout(total=10)


class Webhooks:
    def __init__(self, config: Config, faults: Callable[[], Faults], counters: Callable[[], Counters]) -> None:
        self._config = config
        self._faults = faults  # read at delivery time: faults and counters are replaced by clear/reset
        self._counters = counters
        self._pending: set[asyncio.Task[Any]] = set()
        self._http: ClientSession | None = None

    async def start(self) -> None:
        self._http = ClientSession(timeout=WEBHOOK_TIMEOUT)

    async def stop(self) -> None:
        self.cancel_pending()
        await asyncio.gather(*self._pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def cancel_pending(self) -> None:
        for task in list(self._pending):
            task.cancel()

    def job_ended(self, job: Job) -> None:
        if job.webhook:
            self._spawn(self._deliver(job, job.webhook))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)  # keeps a reference, or the loop may garbage-collect it mid-flight
        task.add_done_callback(self._pending.discard)

    async def _deliver(self, job: Job, url: str) -> None:
        faults = self._faults()
        if random.random() < faults.drop_webhooks:
            self._counters().webhooks_dropped += 1
            return
        copies = 2 if random.random() < faults.duplicate_webhooks else 1
        if faults.webhook_delay_ms:
            await asyncio.sleep(faults.webhook_delay_ms / 1000)
        body = {**job.status_body(), "input": job.input, "webhook": url}
        for _ in range(copies):
            await self._post(url, body)

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        assert self._http is not None
        for attempt in range(WEBHOOK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(self._config.webhook_retry_delay)
            self._counters().webhooks_sent += 1
            try:
                async with self._http.post(url, json=body) as resp:
                    if resp.status == 200:  # RunPod retries anything else, 2xx included
                        return
                    log.warning("webhook for %s answered %s", body["id"], resp.status)
            except (ClientError, TimeoutError) as exc:
                log.warning("webhook for %s failed: %s", body["id"], type(exc).__name__)
        self._counters().webhooks_failed += 1
