"""The batch lane's loop, in every dispatcher: claim the next Gemini batches, submit each, follow it
with bounded polling, and record its images like a realtime run's, so progress, events, the ZIP,
cancel, retry, redo and retention need nothing of their own.

Nothing is kept in memory between looks. A batch's run record says how far it got: claimed (no
name), submitting (`batch_submitting`: a create call under the claim's name began), or named
(`batch_name`). A dispatcher that dies anywhere leaves the batch in BATCH_IN_FLIGHT, leased for
`batch_lease_seconds`; whoever looks next and finds it submitting without a name first looks for it
on Gemini by that name, so a crash never submits a batch twice or loses one.
"""

import asyncio
import logging
import time

from services.dispatcher.backoff import backoff_delay
from services.dispatcher.batch_lane.gemini import RUNNING_STATES, GeminiBatchError, GeminiBatches, state_name
from services.dispatcher.batch_lane.inputs import BatchInputs
from services.dispatcher.batch_lane.outcomes import OutcomeWriter, ResultSink
from services.dispatcher.configs import ConfigCache
from shared import keys, metrics
from shared.models import ImageStatus, RunStatus
from shared.redis_connection import REDIS_DOWN
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.batches import BatchRun, BatchStore
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore

log = logging.getLogger(__name__)

# Batches claimed and looked at per pass; the lane is slow work (hours), a pass is cheap.
CLAIMS_PER_PASS = 8
LOOKS_PER_PASS = 32
LOOK_CONCURRENCY = 8
# A new batch-lane job waits at most this long for its first claim: nothing there is urgent.
TICK_SECONDS = 0.5
# A batch that ends like this is submitted again as a new attempt, then its images fail with the reason.
ENDED_WITHOUT_RESULTS = {
    "JOB_STATE_EXPIRED": "batch_expired",
    "JOB_STATE_FAILED": "batch_failed",
    "JOB_STATE_CANCELLED": "batch_canceled",
}


def display_name(run: ClaimedRun) -> str:
    """The batch's name on Gemini, known before it exists: one per claim of a run."""
    return f"bunch-{run.run_id}-a{run.attempt}-{run.claim}"


class BatchLane:
    def __init__(
        self,
        store: BatchStore,
        runs: RunStore,
        configs: ConfigCache,
        gemini: GeminiBatches,
        storage: Storage,
        settings: Settings,
    ) -> None:
        self.store = store
        self.runs = runs
        self.configs = configs
        self.gemini = gemini
        self.storage = storage
        self.settings = settings
        self.inputs = BatchInputs(gemini, storage, store, settings)
        self._gate = asyncio.Semaphore(LOOK_CONCURRENCY)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await self.pass_once()
            except REDIS_DOWN as exc:
                log.warning("batch lane pass: redis unavailable (%s); retrying", exc)
                busy = False
            except Exception:
                log.exception("batch lane pass failed")
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(stop.wait(), TICK_SECONDS)
                except TimeoutError:
                    pass

    async def pass_once(self) -> bool:
        """Claim, then look at what is due; True when there may be more to do at once."""
        now = time.time()
        claimed = await self.store.claim(now, CLAIMS_PER_PASS)
        due = await self.store.take_due(now, LOOKS_PER_PASS)
        await asyncio.gather(*(self._look_guarded(run_id) for run_id in due))
        return len(claimed) == CLAIMS_PER_PASS or len(due) == LOOKS_PER_PASS

    async def _look_guarded(self, run_id: str) -> None:
        async with self._gate:
            try:
                await self.look(run_id)
            except Exception:
                # Leased: looked at again once the lease runs out.
                log.exception("batch %s: look failed", run_id, extra=_ids(run_id))

    async def look(self, run_id: str) -> None:
        batch = await self.store.get(run_id)
        if batch is None or batch.status != RunStatus.DISPATCHED.value:
            return  # settled or canceled: leave_running took it out of BATCH_IN_FLIGHT already
        if batch.batch_name:
            await self._follow(batch)
        else:
            await self._submit(batch)

    # --- submitting ---------------------------------------------------------------------------------

    async def _submit(self, batch: BatchRun) -> None:
        run = batch.run
        name = None
        try:
            if batch.submitting:
                name = await self.gemini.find(display_name(run), batch.dispatched_at)
            if name is None:
                config = await self.configs.get(batch.job_id)
                slots = list(await self.runs.run_slots(run.run_id, config))
                made = await self.inputs.build(batch.job_id, config, slots)
                lease = time.time() + self.settings.batch_lease_seconds
                if not await self.store.mark(run, "batch_submitting", run.claim, lease):
                    return  # canceled while its input was prepared
                name = await self.gemini.create(made.src, display_name(run))
                metrics.GEMINI_BATCHES.labels("submitted").inc()
        except GeminiBatchError as exc:
            await self._not_submitted(batch, exc)
            return
        first_look = time.time() + self.settings.batch_poll_seconds
        if not await self.store.mark(run, "batch_name", name, first_look):
            # Canceled (or given up on) while it was being created: stop it before Gemini bills it.
            log.warning(
                "batch %s of %s is no longer live; canceling it on Gemini", name, run.run_id, extra=_ids(run.run_id)
            )
            await self.cancel_batches([name])
            return
        log.info("batch %s submitted as %s", run.run_id, name, extra=_ids(run.run_id))

    async def _not_submitted(self, batch: BatchRun, exc: GeminiBatchError) -> None:
        run = batch.run
        if exc.retryable or exc.status in (401, 403):
            # Overload, a quota, the network, or a key an operator must fix: nothing was spent, so
            # wait and try again (a submission that may have gone through is looked for first).
            delay = backoff_delay(
                batch.polls + 1, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds
            )
            log.warning("batch %s not submitted (%s); again in %.0fs", run.run_id, exc, delay, extra=_ids(run.run_id))
            await self.store.look_again(run.run_id, time.time() + delay, batch.polls + 1)
            return
        # The request itself is wrong (Gemini answered 4xx): the same request fails the same way.
        log.error("batch %s refused by Gemini: %s", run.run_id, exc, extra=_ids(run.run_id))
        await self._fail_images(batch, "bad_request", f"Gemini refused the batch: {exc}")

    # --- following ----------------------------------------------------------------------------------

    async def _follow(self, batch: BatchRun) -> None:
        run = batch.run
        try:
            job = await self.gemini.get(batch.batch_name)
        except GeminiBatchError as exc:
            if exc.status == 404:
                await self._ended(batch, "batch_failed", f"Gemini no longer knows batch {batch.batch_name}")
                return
            await self._poll_later(batch)
            log.warning("batch %s: Gemini did not answer (%s)", run.run_id, exc, extra=_ids(run.run_id))
            return
        state = state_name(job)
        if state in RUNNING_STATES:
            await self._poll_later(batch)
            return
        if state == "JOB_STATE_SUCCEEDED":
            await self._succeeded(batch, job)
            return
        reason = ENDED_WITHOUT_RESULTS.get(state, "batch_failed")
        detail = f"{state}" + (f": {job.error.message}" if job.error and job.error.message else "")
        await self._ended(batch, reason, detail)

    async def _poll_later(self, batch: BatchRun) -> None:
        s = self.settings
        wait = min(s.batch_poll_max_seconds, s.batch_poll_seconds * 2 ** min(batch.polls, 16))
        await self.store.look_again(batch.run.run_id, time.time() + wait, batch.polls + 1)

    async def _succeeded(self, batch: BatchRun, job: object) -> None:
        run = batch.run
        config = await self.configs.get(batch.job_id)
        slots = list(await self.runs.run_slots(run.run_id, config))
        writer = OutcomeWriter(self.storage, run)
        dest = getattr(job, "dest", None)
        if dest is not None and dest.inlined_responses is not None:
            records = await writer.from_inline(slots, dest.inlined_responses)
        elif dest is not None and dest.file_name:
            file_name = dest.file_name

            async def download(sink: ResultSink) -> None:
                await self.gemini.download(file_name, sink)

            records = await writer.from_download(slots, download)
        else:
            records = {index: writer.failed("upstream_error", "the batch succeeded without results") for index in slots}
        if await self.runs.complete(
            Completion(run.run_id, run.attempt, run.claim, RunStatus.SUCCEEDED, records, lane="batch")
        ):
            metrics.GEMINI_BATCHES.labels("succeeded").inc()
            for record in records.values():
                metrics.IMAGES.labels(record.status.value).inc()
                if record.status == ImageStatus.FAILED:
                    metrics.GEMINI_ERRORS.labels(record.error or "unknown").inc()
            await self.store.note_turnaround(time.time() - batch.dispatched_at)

    async def _ended(self, batch: BatchRun, reason: str, detail: str) -> None:
        """The batch ended without results: submitted again as a new attempt, or, after the last,
        each of its images fails with the reason."""
        run = batch.run
        metrics.GEMINI_BATCHES.labels(reason).inc()
        if run.attempt < self.settings.batch_max_attempts:
            delay = backoff_delay(
                run.attempt, self.settings.retry_backoff_seconds, self.settings.retry_backoff_max_seconds
            )
            await self.runs.requeue(
                run.run_id, run.attempt, run.claim, time.time() + delay, new_attempt=True, reason=f"{reason}: {detail}"
            )
            log.warning(
                "batch %s %s (%s); submitting it again in %.0fs",
                run.run_id,
                reason,
                detail,
                delay,
                extra=_ids(run.run_id),
            )
            return
        log.error("batch %s %s after %d attempts: %s", run.run_id, reason, run.attempt, detail, extra=_ids(run.run_id))
        await self._fail_images(batch, reason, detail)

    async def _fail_images(self, batch: BatchRun, reason: str, detail: str) -> None:
        run = batch.run
        config = await self.configs.get(batch.job_id)
        writer = OutcomeWriter(self.storage, run)
        records: dict[int, ImageRecord] = {
            index: writer.failed(reason, detail) for index in await self.runs.run_slots(run.run_id, config)
        }
        await self.runs.complete(
            Completion(run.run_id, run.attempt, run.claim, RunStatus.FAILED, records, lane="batch")
        )

    # --- canceling ----------------------------------------------------------------------------------

    async def cancel_batches(self, names: list[str]) -> None:
        """Cancel each on Gemini (the job was canceled: cancel.lua settled its runs already)."""

        async def cancel(name: str) -> None:
            try:
                await self.gemini.cancel(name)
                metrics.GEMINI_BATCHES.labels("canceled").inc()
            except GeminiBatchError as exc:
                if exc.retryable:
                    raise  # the control message is delivered again
                log.warning("Gemini did not cancel %s: %s", name, exc)

        await asyncio.gather(*(cancel(name) for name in names))


def _ids(run_id: str) -> dict[str, str]:
    return {"job_id": keys.split_run_id(run_id)[0], "run_id": run_id}
