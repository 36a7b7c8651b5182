"""Turn what RunPod says about a run (webhook or /status) into its final outcome, exactly once."""

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from services.dispatcher.backoff import backoff_delay
from services.dispatcher.configs import ConfigCache
from services.dispatcher.verify import ResultVerifier, parse_outcomes
from shared import keys, metrics
from shared.models import ImageStatus, RunStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore

log = logging.getLogger(__name__)

FINAL_FAILURES = {"FAILED", "TIMED_OUT", "CANCELLED"}
# Our own marker: /status answered 404, so the run's result is gone (RunPod keeps it 30 min).
EXPIRED = "EXPIRED"


class ResultHandler:
    def __init__(
        self,
        runs: RunStore,
        configs: ConfigCache,
        settings: Settings,
        complete: Callable[[Completion], Awaitable[bool]],
        storage: Storage,
    ) -> None:
        self.runs = runs
        self.configs = configs
        self.settings = settings
        # Dispatcher.complete: the outcome is stored in the same round trip as the next claims.
        self.complete = complete
        self.verifier = ResultVerifier(storage, settings)

    async def __call__(self, fields: dict[str, str]) -> None:
        # "claim" is absent from messages written before claims had names.
        run = ClaimedRun(fields["run_id"], int(fields["attempt"]), fields.get("claim", ""))
        body = json.loads(fields.get("body") or "{}")
        status = body.get("status")
        if status == "COMPLETED":
            await self._completed(run, body.get("output"))
        elif status in FINAL_FAILURES or status == EXPIRED:
            metrics.RUNPOD_ERRORS.labels(status.lower()).inc()
            await self._failed(run, f"{status}: {_error_text(body)}")
        # IN_QUEUE / IN_PROGRESS: nothing final to record.

    async def _current(self, claimed: ClaimedRun) -> bool:
        """Whether `claimed` is the run's claim in flight: not settled, superseded or lost."""
        run = await self.runs.run(claimed.run_id)
        return (
            run is not None
            and (run.attempt, run.claim) == (claimed.attempt, claimed.claim)
            and run.status == RunStatus.DISPATCHED
        )

    async def _completed(self, claimed: ClaimedRun, output: Any) -> None:
        run_id, attempt, claim = claimed
        if not await self._current(claimed):
            return  # settled already (COMPLETE_RUN would refuse it): spare reading its images again
        job_id, _ = keys.split_run_id(run_id)
        config = await self.configs.get(job_id)
        slots = list(await self.runs.run_slots(run_id, config))
        # Checked against the stored objects before anything is recorded, so the job cannot reach
        # packaging with an image that is not there; raises (message retried) if storage is down.
        records = await self.verifier.records(claimed, slots, parse_outcomes(output, self.settings))
        if await self.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, records)):
            # Counted only when recorded, so duplicates of a result do not count twice.
            for record in records.values():
                metrics.IMAGES.labels(record.status.value).inc()
                if record.status == ImageStatus.FAILED:
                    metrics.GEMINI_ERRORS.labels(record.error or "unknown").inc()
            log.debug("run %s attempt %s completed", run_id, attempt, extra=_ids(run_id))

    async def _failed(self, claimed: ClaimedRun, reason: str) -> None:
        run_id, attempt, claim = claimed
        if not await self._current(claimed):
            return  # stale or duplicate news about a claim that is already settled
        if attempt < self.settings.max_run_attempts:
            delay = backoff_delay(attempt, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds)
            await self.runs.requeue(run_id, attempt, claim, time.time() + delay, new_attempt=True, reason=reason)
            log.warning(
                "run %s attempt %s failed (%s); retrying in %.1fs", run_id, attempt, reason, delay, extra=_ids(run_id)
            )
            return
        job_id, _ = keys.split_run_id(run_id)
        config = await self.configs.get(job_id)
        now = time.time()
        records = {
            index: ImageRecord(
                status=ImageStatus.FAILED, attempt=attempt, error="run_failed", detail=reason[:500], finished_at=now
            )
            for index in await self.runs.run_slots(run_id, config)
        }
        if await self.complete(Completion(run_id, attempt, claim, RunStatus.FAILED, records)):
            log.error("run %s failed after %s attempts: %s", run_id, attempt, reason, extra=_ids(run_id))


def _ids(run_id: str) -> dict[str, str]:
    return {"job_id": keys.split_run_id(run_id)[0], "run_id": run_id}


def _error_text(body: dict[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, str):
        try:
            parsed = json.loads(error)
            if isinstance(parsed, dict):
                return str(parsed.get("error_message") or parsed.get("error_type") or error)[:300]
        except ValueError:
            pass
        return error[:300]
    return "no error given" if error is None else str(error)[:300]
