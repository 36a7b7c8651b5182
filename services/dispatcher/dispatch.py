"""Start queued runs on RunPod while fewer than the cap are in flight."""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

from services.dispatcher.backoff import backoff_delay
from services.dispatcher.configs import ConfigCache
from services.dispatcher.payloads import build_run_input, policy, webhook_url
from services.dispatcher.runpod_client import RunPodClient, RunPodError
from shared import keys, metrics
from shared.models import ImageStatus, RunStatus
from shared.redis_connection import REDIS_DOWN
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.records import ClaimedRun, Claims, Completion, ImageRecord, StartedRun
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore

log = logging.getLogger(__name__)

# Runs claimed per Lua call: one call per pass in the steady state (a slot or two free up at a
# time), few when a backlog meets free slots; small enough that one call stays short for Redis.
CLAIM_BATCH = 16
STARTED_RECORD_DELAY = 0.005


class Dispatcher:
    def __init__(
        self,
        runs: RunStore,
        configs: ConfigCache,
        storage: Storage,
        runpod: RunPodClient,
        settings: Settings,
        wakeup: asyncio.Event,
        upstream: UpstreamStore,
    ) -> None:
        self.runs = runs
        self.upstream = upstream
        self.configs = configs
        self.storage = storage
        self.runpod = runpod
        self.settings = settings
        self.wakeup = wakeup
        self._starting: set[asyncio.Task[None]] = set()
        # Accepted by RunPod, its id not yet recorded: that happens with the next pass.
        self._started: list[StartedRun] = []
        # Run outcomes waiting for the next pass, with whoever waits to hear they are stored.
        self._completions: list[tuple[Completion, asyncio.Future[bool]]] = []
        self._stopped = False
        # Holds in a row for an unreachable RunPod: each lasts twice the one before. Pacing only,
        # per replica; nothing is lost with it.
        self._unreachable_holds = 0

    async def run(self, stop: asyncio.Event, idle_wait: float = 0.25) -> None:
        while not stop.is_set():
            # Cleared before the pass, so news that arrives during it wakes the next one at once.
            self.wakeup.clear()
            try:
                await self.start_available()
            except REDIS_DOWN as exc:  # a restart or a failover: the next pass finds it again
                log.warning("dispatch pass: redis unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("dispatch pass failed")
                await asyncio.sleep(1.0)
            # Woken at once by news: a run of this process ended or started, or a job was queued
            # anywhere (services/dispatcher/wakeups.py); other replicas' runs ending and retries
            # coming due are seen on the next timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_wait):  # unlike wait_for, no task per pass
                    await self.wakeup.wait()
        # Hand back nothing half-done: let /run calls already on the wire record their ids, and
        # store the outcomes already handed over; from now on outcomes are stored directly.
        self._stopped = True
        if self._starting:
            await asyncio.wait(self._starting, timeout=15)
        try:
            await self._pass(limit=0)
        except Exception:
            log.exception("could not store what this dispatcher still held; it is delivered again")

    async def complete(self, completion: Completion) -> bool:
        """Store a run's outcome in the next pass, in one round trip with the claims it frees a
        slot for; True when this call stored it (not an earlier delivery)."""
        if self._stopped:
            return await self.runs.complete(completion)
        future = asyncio.get_running_loop().create_future()
        self._completions.append((completion, future))
        self.wakeup.set()
        return await future

    async def start_available(self) -> None:
        # A full batch of claims means more may start at once.
        while len(await self._pass(limit=CLAIM_BATCH)) == CLAIM_BATCH:
            continue

    async def _pass(self, limit: int) -> list[ClaimedRun]:
        """Store the outcomes handed over, record the RunPod ids of runs started since the last
        pass, claim up to `limit` runs and start them: one Redis round trip."""
        completions, self._completions = self._completions, []
        started, self._started = self._started, []
        now = time.time()
        stored: list[bool | Exception]
        claims: Claims | Exception
        try:
            stored, claims = await self.runs.settle_and_claim(
                [completion for completion, _ in completions],
                now,
                now + self.settings.webhook_grace_seconds,
                limit,
                started,
            )
        except Exception as exc:  # Redis unreachable: nothing of the pass happened
            stored, claims = [exc] * len(completions), exc
        except BaseException:
            self._started[:0] = started
            for _, future in completions:
                future.cancel()
            raise
        for (_, future), outcome in zip(completions, stored, strict=True):
            if future.done():  # its waiter gave up (shutdown)
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)  # the outcome's message stays pending, delivered again
            else:
                future.set_result(outcome)
        if isinstance(claims, Exception):
            self._started[:0] = started  # not recorded: the next pass tries again
            raise claims
        await self._settle_started(started, claims.recorded)
        for claim in claims.runs:
            task = asyncio.create_task(self.start(*claim))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
        return claims.runs

    async def start(self, run_id: str, attempt: int, claim: str) -> None:
        job_id, _ = keys.split_run_id(run_id)
        ids = {"job_id": job_id, "run_id": run_id, "attempt": attempt}
        claimed = time.monotonic()
        try:
            config = await self.configs.get(job_id)
            slots = await self.runs.run_slots(run_id, config)
            run_input = build_run_input(config, run_id, slots, attempt, claim, self.storage, self.settings)
            runpod_id = await self.runpod.run(
                run_input.model_dump(mode="json"),
                webhook_url(run_id, attempt, claim, self.settings),
                policy(self.settings),
            )
        except RunPodError as exc:
            metrics.RUNPOD_ERRORS.labels(f"run_{exc.status or 'unreachable'}").inc()
            await self._not_started(ClaimedRun(run_id, attempt, claim), slots, exc)
            return
        except Exception:
            # Redis trouble: the run stays claimed and the poller requeues it once overdue.
            log.exception("could not start run %s", run_id, extra=ids)
            return
        self._unreachable_holds = 0
        metrics.DISPATCH_LATENCY.observe(time.monotonic() - claimed)
        metrics.RUNS_STARTED.inc()
        # Recorded by the next pass, which the next run outcome brings when runs are many; a pass
        # of its own for each would double the round trips per run. When runs are few, a pass
        # comes after STARTED_RECORD_DELAY: the gateway checks webhook bodies against this id.
        self._started.append(StartedRun(run_id, attempt, claim, runpod_id))
        asyncio.get_running_loop().call_later(STARTED_RECORD_DELAY, self._record_started_soon)

    def _record_started_soon(self) -> None:
        if self._started:
            self.wakeup.set()

    async def _settle_started(self, started: list[StartedRun], recorded: list[bool]) -> None:
        for run, live in zip(started, recorded, strict=True):
            ids = {"job_id": keys.split_run_id(run.run_id)[0], "run_id": run.run_id, "attempt": run.attempt}
            if live:
                log.debug("run %s attempt %s started as %s", run.run_id, run.attempt, run.runpod_id, extra=ids)
                continue
            current = await self.runs.run(run.run_id)
            if (
                current is None
                or current.status == RunStatus.CANCELED
                or (current.attempt, current.claim) != (run.attempt, run.claim)
            ):
                # Canceled while /run was on the wire (and maybe archived with its job since: its
                # record is gone), or given up on meanwhile (its start took longer than the webhook
                # grace, so the poller started it again as a new attempt), or its claim was lost
                # with Redis's last writes and made again: this execution can no longer count, so
                # stop it on RunPod instead of paying for it.
                log.warning("run %s is no longer live; canceling %s", run.run_id, run.runpod_id, extra=ids)
                await self.cancel_on_runpod([run.runpod_id])

    async def cancel_on_runpod(self, runpod_ids: list[str]) -> None:
        """Cancel each on RunPod, as fast as the client's /cancel gate allows (a bulk cancel of
        thousands takes minutes rather than meeting RunPod's limit and running out of retries)."""

        async def cancel(runpod_id: str) -> None:
            try:
                await self.runpod.cancel(runpod_id)
            except RunPodError as exc:
                if exc.refused:
                    metrics.RUNPOD_REFUSED.labels("cancel").inc()
                log.warning("RunPod did not cancel %s: %s", runpod_id, exc)

        await asyncio.gather(*(cancel(runpod_id) for runpod_id in runpod_ids))

    async def handle_control(self, fields: dict[str, str]) -> None:
        if fields.get("action") == "cancel":
            await self.cancel_on_runpod(json.loads(fields.get("runpod_ids") or "[]"))

    async def _hold_while_unreachable(self, run: ClaimedRun, exc: RunPodError) -> None:
        """No answer at all, after the client's own retries (a wrong URL, DNS, a network down):
        every run would fail the same way. The queue waits, visibly (/api/queue/stats, the console),
        instead of each run retrying on its own with nothing shown; the hold ends by itself, and the
        next one, while RunPod stays out of reach, lasts twice as long (up to the retry cap)."""
        current = await self.upstream.current()
        if current is None or current.reason != "runpod_unreachable":
            self._unreachable_holds += 1  # not for runs that were already on their way meanwhile
        base, cap = self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds
        wait = min(cap, base * 2 ** (self._unreachable_holds - 1))
        now = time.time()
        if await self.upstream.hold("runpod_unreachable", f"RunPod did not answer /run: {exc}", now + wait):
            metrics.UPSTREAM_HOLDS.labels("runpod_unreachable").inc()
            log.warning("RunPod did not answer (%s): holding the queue for %.0fs", exc, wait)
        # The same attempt: it never started, so nothing of it can arrive later.
        await self.runs.requeue(run.run_id, run.attempt, run.claim, now + wait, new_attempt=False, reason=str(exc))

    async def _not_started(self, run: ClaimedRun, slots: Sequence[int], exc: RunPodError) -> None:
        run_id, attempt, claim = run
        ids = {"job_id": keys.split_run_id(run_id)[0], "run_id": run_id, "attempt": attempt}
        if exc.refused:
            # Every start would be refused the same way: hold the queue until an operator fixes
            # the key or the endpoint, and keep this run (it never started) for then.
            metrics.RUNPOD_REFUSED.labels("run").inc()
            if await self.upstream.hold("runpod_auth_failed", f"RunPod refused /run: {exc}", None):
                metrics.UPSTREAM_HOLDS.labels("runpod_auth_failed").inc()
                log.error("RunPod refused run %s (%s): holding the queue", run_id, exc, extra=ids)
            await self.runs.requeue(run_id, attempt, claim, time.time(), new_attempt=False, reason=str(exc))
            return
        if exc.status is None:
            await self._hold_while_unreachable(run, exc)
            return
        if exc.retryable:
            delay = backoff_delay(attempt, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds)
            log.warning("RunPod did not take run %s (%s); trying again in %.1fs", run_id, exc, delay, extra=ids)
            # The same attempt: it never started, so nothing of it can arrive later.
            await self.runs.requeue(run_id, attempt, claim, time.time() + delay, new_attempt=False, reason=str(exc))
            return
        log.error("RunPod refused run %s: %s", run_id, exc, extra=ids)
        now = time.time()
        records = {
            index: ImageRecord(
                status=ImageStatus.FAILED,
                attempt=attempt,
                error="dispatch_rejected",
                detail=str(exc)[:500],
                finished_at=now,
            )
            for index in slots
        }
        await self.runs.complete(Completion(run_id, attempt, claim, RunStatus.FAILED, records))
