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
from shared.models import FailureReason, ImageStatus, RunStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore, next_quota_reset

log = logging.getLogger(__name__)

FINAL_FAILURES = {"FAILED", "TIMED_OUT", "CANCELLED"}
# Our own marker: /status answered 404, so the run's result is gone (RunPod keeps it 30 min).
EXPIRED = "EXPIRED"
# Failures that every run would meet the same way until the quota resets or an operator acts:
# the queue is held instead of spending RunPod time on runs that cannot succeed.
HOLDING_FAILURES = frozenset({FailureReason.QUOTA_EXHAUSTED, FailureReason.AUTH_FAILED})


class ResultHandler:
    def __init__(
        self,
        runs: RunStore,
        configs: ConfigCache,
        settings: Settings,
        complete: Callable[[Completion], Awaitable[bool]],
        storage: Storage,
        upstream: UpstreamStore,
    ) -> None:
        self.runs = runs
        self.upstream = upstream
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
        # No attempt runs longer than the executionTimeout each run is sent with.
        limit_ms = self.settings.execution_timeout_seconds * 1000
        if status == "COMPLETED":
            await self._completed(run, body.get("output"), execution_ms(body, limit_ms))
        elif status in FINAL_FAILURES or status == EXPIRED:
            metrics.RUNPOD_ERRORS.labels(status.lower()).inc()
            await self._failed(run, f"{status}: {_error_text(body)}", execution_ms(body, limit_ms))
        # IN_QUEUE / IN_PROGRESS: nothing final to record.

    async def _current(self, claimed: ClaimedRun) -> bool:
        """Whether `claimed` is the run's claim in flight: not settled, superseded or lost."""
        run = await self.runs.run(claimed.run_id)
        return (
            run is not None
            and (run.attempt, run.claim) == (claimed.attempt, claimed.claim)
            and run.status == RunStatus.DISPATCHED
        )

    async def _completed(self, claimed: ClaimedRun, output: Any, runpod_ms: int) -> None:
        run_id, attempt, claim = claimed
        if not await self._current(claimed):
            return  # settled already (COMPLETE_RUN would refuse it): spare reading its images again
        job_id, _ = keys.split_run_id(run_id)
        config = await self.configs.get(job_id)
        slots = list(await self.runs.run_slots(run_id, config))
        # Checked against the stored objects before anything is recorded, so the job cannot reach
        # packaging with an image that is not there; raises (message retried) if storage is down.
        records = await self.verifier.records(claimed, slots, parse_outcomes(output, self.settings))
        if await self._held_back(claimed, records):
            return
        completion = Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, records, runpod_ms=runpod_ms)
        if await self.complete(completion):
            # Counted only when recorded, so duplicates of a result do not count twice.
            for record in records.values():
                metrics.IMAGES.labels(record.status.value).inc()
                if record.status == ImageStatus.FAILED:
                    metrics.GEMINI_ERRORS.labels(record.error or "unknown").inc()
            log.debug("run %s attempt %s completed", run_id, attempt, extra=_ids(run_id))

    async def _held_back(self, claimed: ClaimedRun, records: dict[int, ImageRecord]) -> bool:
        """Hold the queue when the run met a failure every run would meet; True when the run was
        put back to start again once the hold ends (nothing of it succeeded, so nothing is lost)."""
        holding = next((r for r in records.values() if r.error in HOLDING_FAILURES), None)
        if holding is None or holding.error is None:
            return False
        now = time.time()
        reason = FailureReason(holding.error)
        until = next_quota_reset(now) if reason == FailureReason.QUOTA_EXHAUSTED else None
        detail = holding.detail or reason.value
        if await self.upstream.hold(reason.value, detail, until, now):
            metrics.UPSTREAM_HOLDS.labels(reason.value).inc()
            log.error("holding the queue (%s): %s", reason.value, detail, extra=_ids(claimed.run_id))
        if any(record.status == ImageStatus.SUCCEEDED for record in records.values()):
            return False  # keep what it made; its failed images can be retried after the hold
        # The same attempt: the run never got to Gemini's work, so it costs no retry.
        run_id, attempt, claim = claimed
        await self.runs.requeue(run_id, attempt, claim, now, new_attempt=False, reason=f"{reason.value}: {detail}")
        return True

    async def _failed(self, claimed: ClaimedRun, reason: str, runpod_ms: int = 0) -> None:
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
        if await self.complete(Completion(run_id, attempt, claim, RunStatus.FAILED, records, runpod_ms=runpod_ms)):
            log.error("run %s failed after %s attempts: %s", run_id, attempt, reason, extra=_ids(run_id))


def _ids(run_id: str) -> dict[str, str]:
    return {"job_id": keys.split_run_id(run_id)[0], "run_id": run_id}


def execution_ms(body: dict[str, Any], limit_ms: int) -> int:
    """RunPod's executionTime of the attempt the body is about, in ms (what it bills; 0 when the body
    has none, such as our EXPIRED marker). Bounded, since anyone holding a run's webhook token can
    write the body: at most `limit_ms`, the run's executionTimeout."""
    value = body.get("executionTime")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 0
    return int(min(max(value, 0), limit_ms))


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
