"""The fallback when a webhook is overdue: ask RunPod's /status and feed the answer to the same path.

Every run has a maximum age: dispatch time + RunPod ttl (which covers its queue and execution) +
the webhook grace. Past it, RunPod has deleted the run whatever /status says or fails to say, so
the run is given up on (retried as a new attempt, or failed) instead of being asked forever; and
RunPod refusing /status (401/403/405: a rotated key, a deleted endpoint) counts toward giving up
after `poll_max_refusals` answers, with an alert metric, rather than postponing without end.
"""

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from services.dispatcher.results import EXPIRED, FINAL_FAILURES
from services.dispatcher.runpod_client import RunPodClient, RunPodError
from shared import keys, metrics, task_results
from shared.models import RunStatus
from shared.redis_connection import REDIS_DOWN
from shared.settings import Settings
from shared.stores.records import RunRecord
from shared.stores.runs import RunStore

log = logging.getLogger(__name__)


class Poller:
    def __init__(self, runs: RunStore, redis: Redis, runpod: RunPodClient, settings: Settings) -> None:
        self.runs = runs
        self.redis = redis
        self.runpod = runpod
        self.settings = settings
        # RunPod's ttl alone covers queue and execution; the execution timeout on top is a margin
        # against the two clocks starting at different moments.
        self.max_age_seconds = (
            settings.run_ttl_seconds + settings.execution_timeout_seconds + settings.webhook_grace_seconds
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.poll_overdue()
            except REDIS_DOWN as exc:
                log.warning("poll pass: redis unavailable (%s); retrying", exc)
            except Exception:
                log.exception("poll pass failed")
            try:
                await asyncio.wait_for(stop.wait(), self.settings.poll_interval_seconds)
            except TimeoutError:
                pass

    async def poll_overdue(self) -> None:
        now = time.time()
        overdue = await self.runs.overdue_runs(now)
        await asyncio.gather(*(self.check(run_id, now) for run_id in overdue))

    async def check(self, run_id: str, now: float) -> None:
        next_look = now + self.settings.poll_interval_seconds
        run = await self.runs.run(run_id)
        if run is None or run.status != RunStatus.DISPATCHED:
            # Settled by a script that forgot nothing else; only a stray index entry is left.
            if run is None:
                await self.redis.zrem(keys.RUNNING, run_id)
            else:
                await self.runs.release_slots(run_id, run.project)
            return
        if not run.runpod_id:
            # Claimed but never confirmed started: its dispatcher died mid-call. A new attempt
            # keeps any orphan execution's late output and webhook apart from the retry.
            await self.runs.requeue(run_id, run.attempt, run.claim, now, new_attempt=True, reason="start not confirmed")
            return
        too_old = run.dispatched_at is not None and now > run.dispatched_at + self.max_age_seconds
        try:
            body = await self.runpod.status(run.runpod_id)
        except RunPodError as exc:
            metrics.RUNPOD_ERRORS.labels(f"status_{exc.status or 'unreachable'}").inc()
            log.warning("status of run %s unavailable: %s", run_id, exc, extra={"run_id": run_id})
            if exc.refused:
                metrics.RUNPOD_REFUSED.labels("status").inc()
                refusals = await self.runs.count_status_refusal(run_id)
                if refusals >= self.settings.poll_max_refusals:
                    await self._give_up(run_id, run, f"RunPod refused /status {refusals} times ({exc})")
            elif too_old:
                await self._give_up(
                    run_id, run, f"no final answer from RunPod within its maximum age of {self.max_age_seconds:.0f} s"
                )
            await self.runs.postpone(run_id, next_look)
            return
        if body is None:
            body = {"id": run.runpod_id, "status": EXPIRED, "error": "RunPod no longer knows this run"}
        if body.get("status") == "COMPLETED" or body.get("status") in FINAL_FAILURES | {EXPIRED}:
            await task_results.publish(self.redis, run_id, run.attempt, run.claim, body, "poll")
        elif too_old:
            # RunPod deletes a run at its ttl whatever /status still says: this one will not end.
            await self._give_up(
                run_id, run, f"still {body.get('status')} past its maximum age of {self.max_age_seconds:.0f} s"
            )
        await self.runs.postpone(run_id, next_look)

    async def _give_up(self, run_id: str, run: RunRecord, reason: str) -> None:
        """End the run's claim as lost: the result path retries it as a new attempt (or fails it),
        and RunPod is asked, best effort, to stop an execution that may still be going."""
        log.warning("giving up on run %s attempt %s: %s", run_id, run.attempt, reason, extra={"run_id": run_id})
        body = {"id": run.runpod_id, "status": EXPIRED, "error": reason}
        await task_results.publish(self.redis, run_id, run.attempt, run.claim, body, "poll")
        with contextlib.suppress(RunPodError):
            await self.runpod.cancel(run.runpod_id)
