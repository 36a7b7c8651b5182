"""The endpoint's queue and every job's state, shared by the REST API and the workers.

A job waits IN_QUEUE until a worker takes it (job-take), runs IN_PROGRESS on that worker, and ends
COMPLETED or FAILED when the worker reports (job-done), CANCELLED on /cancel, TIMED_OUT at its
executionTimeout. Its policy ttl covers the queue and the execution: past it the job is deleted
(/status 404), running or not (https://docs.runpod.io/serverless/endpoints/job-operations, "Execution
policies"). Whenever a running job ends without its worker reporting (cancel, timeout, ttl), the worker
gets a stop signal on its job-stop channel: runpod-python's rp_scale.JobScaler.monitor_stop_signals
cancels just that job's task ("RunPod can signal a worker to stop a specific job if a request is
cancelled, expires, or times out", runpod-python README).
"""

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from deploy.emulators.runpod.model import (
    CANCELLED,
    COMPLETED,
    EMULATED_FAILURE,
    FAILED,
    FINAL,
    FINAL_COUNTER,
    IN_PROGRESS,
    IN_QUEUE,
    TIMED_OUT,
    Config,
    Counters,
    Faults,
    Job,
)

log = logging.getLogger("emulator.runpod")

TAKES_KEPT = 100


class Seat:
    """One worker as the queue sees it: the jobs it holds, and the stop signals it has yet to collect.

    Subprocess workers collect their stop signals by long-polling job-stop; in-process workers pass
    `on_stop`, which stops the job's task at once.
    """

    def __init__(self, pod_id: str, on_stop: Callable[[str], None] | None = None) -> None:
        self.pod_id = pod_id
        self.on_stop = on_stop
        self.held: set[str] = set()
        self.max_held = 0
        # Seconds with at least one job held: what RunPod bills a worker for (bench/worker_seconds.py).
        self._busy_seconds = 0.0
        self._busy_since: float | None = None
        self.takes: deque[int] = deque(maxlen=TAKES_KEPT)  # jobs handed out per job-take, latest last
        self.seen_at: float | None = None  # its first job-take or ping: it finished starting
        self.last_ping: dict[str, str] | None = None
        self.stopping = False  # told to shut down: no more jobs, long polls answered at once
        self._stops: list[str] = []
        self._stop_arrived = asyncio.Event()

    def hold(self, job_id: str) -> None:
        if not self.held:
            self._busy_since = time.monotonic()
        self.held.add(job_id)
        self.max_held = max(self.max_held, len(self.held))

    def drop(self, job_id: str | None = None) -> None:
        """Let go of one job, or of every job (None)."""
        if job_id is None:
            self.held.clear()
        else:
            self.held.discard(job_id)
        if not self.held and self._busy_since is not None:
            self._busy_seconds += time.monotonic() - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        ongoing = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_seconds + ongoing

    def reset_counts(self) -> None:
        self.drop()
        self.max_held = 0
        self._busy_seconds = 0.0
        self.takes.clear()

    def signal_stop(self, job_id: str) -> None:
        if self.on_stop is not None:
            self.on_stop(job_id)
            return
        if job_id not in self._stops:
            self._stops.append(job_id)
        self._stop_arrived.set()

    async def collect_stops(self, wait_s: float) -> list[str]:
        if not self._stops and not self.stopping:
            try:
                await asyncio.wait_for(self._stop_arrived.wait(), wait_s)
            except TimeoutError:
                pass
        self._stop_arrived.clear()
        stops, self._stops = self._stops, []
        return stops

    def release_polls(self) -> None:
        self._stop_arrived.set()


class Board:
    def __init__(self, config: Config, faults: Faults, on_final: Callable[[Job], None]) -> None:
        self.config = config
        self.faults = faults
        self.on_final = on_final  # a job reached a final status in the current epoch (webhooks)
        self.counters = Counters()
        self.jobs: dict[str, Job] = {}
        self.seats: dict[str, Seat] = {}
        self.running: set[str] = set()
        # Bumped by reset so jobs from before it cannot touch the fresh counters.
        self.epoch = 0
        self.draining = False
        self._queue: deque[Job] = deque()  # FIFO; cancelled or deleted entries are skipped when reached
        # Long polls waiting for a job, oldest first: a new job wakes one, not all of them (a
        # benchmark runs 50 in-process workers).
        self._waiters: deque[asyncio.Future[None]] = deque()

    # ---- submission and lookup

    def submit(
        self, endpoint: str, job_input: Any, webhook: str | None, timeout_s: float, ttl_s: float, result_ttl_s: float
    ) -> Job:
        job = Job(
            id=f"{uuid.uuid4()}-e1",
            endpoint=endpoint,
            input=job_input,
            webhook=webhook,
            execution_timeout_s=timeout_s,
            ttl_s=ttl_s,
            result_ttl_s=result_ttl_s,
            epoch=self.epoch,
        )
        self.jobs[job.id] = job
        self._enqueue(job)
        return job

    def _enqueue(self, job: Job) -> None:
        self._queue.append(job)
        self._at(job, job.received_at + job.ttl_s, self._ttl_reached)
        self._wake()

    def _wake(self, everyone: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # done: it timed out or its request went away
                waiter.set_result(None)
                if not everyone:
                    return

    def lookup(self, endpoint: str, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.endpoint != endpoint:
            return None
        if self._result_expired(job, time.time()):
            self.jobs.pop(job_id, None)
            return None
        return job

    def _result_expired(self, job: Job, now: float) -> bool:
        return job.finished_at is not None and now > job.finished_at + job.result_ttl_s

    def sweep(self) -> None:
        now = time.time()
        for job_id in [j.id for j in self.jobs.values() if self._result_expired(j, now)]:
            del self.jobs[job_id]

    def count(self, status: str) -> int:
        return sum(1 for job in self.jobs.values() if job.status == status)

    # ---- timers

    def _at(self, job: Job, wall_time: float, callback: Callable[[Job, float], None]) -> None:
        loop = asyncio.get_running_loop()
        job.timers.append(loop.call_later(max(0.0, wall_time - time.time()), callback, job, wall_time))

    def _early(self, job: Job, wall_time: float, callback: Callable[[Job, float], None]) -> bool:
        # uvloop's millisecond timers can fire a little early; the policy is a wall-clock promise.
        if time.time() < wall_time:
            self._at(job, wall_time, callback)
            return True
        return False

    def _ttl_reached(self, job: Job, at: float) -> None:
        if self.jobs.get(job.id) is not job or job.status in FINAL or self._early(job, at, self._ttl_reached):
            return
        log.info("job %s reached its ttl while %s: deleted", job.id, job.status)
        if job.status == IN_PROGRESS:
            self._release(job)
            self._stop_on_worker(job)
        job.cancel_timers()
        del self.jobs[job.id]
        job.done.set()
        if job.epoch == self.epoch:
            self.counters.expired += 1

    def _timeout_reached(self, job: Job, at: float) -> None:
        if job.status != IN_PROGRESS or self._early(job, at, self._timeout_reached):
            return
        self._stop_on_worker(job)
        self.finish(job, TIMED_OUT)

    # ---- the worker side

    def add_seat(self, pod_id: str, on_stop: Callable[[str], None] | None = None) -> Seat:
        seat = self.seats[pod_id] = Seat(pod_id, on_stop)
        return seat

    def stop_seat(self, seat: Seat) -> None:
        """The worker is shutting down (SIGTERM): it gets no more jobs and its long polls end now."""
        seat.stopping = True
        seat.release_polls()
        self._wake(everyone=True)

    async def take(self, seat: Seat, wanted: int, wait_s: float) -> list[Job]:
        """Up to `wanted` jobs for this worker: at once if any are queued, else the first to arrive
        within `wait_s` (a long poll), else none (job-take answers 204)."""
        deadline = time.monotonic() + wait_s
        woken = False
        while True:
            if self.draining or seat.stopping:
                if woken:
                    self._wake()  # the job it was woken for is for another worker
                return []
            jobs = self._pop(seat, wanted)
            left = deadline - time.monotonic()
            if jobs or left <= 0:
                return jobs
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
                woken = True
            except TimeoutError:
                self._forget(waiter)
                return []
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken for a job it will not take now: pass the wake on
                self._forget(waiter)
                raise

    def _forget(self, waiter: "asyncio.Future[None]") -> None:
        with contextlib.suppress(ValueError):  # already taken off by a wake
            self._waiters.remove(waiter)

    def _pop(self, seat: Seat, wanted: int) -> list[Job]:
        taken: list[Job] = []
        while self._queue and len(taken) < wanted:
            job = self._queue.popleft()
            if job.status != IN_QUEUE or self.jobs.get(job.id) is not job:
                continue  # cancelled, purged, reset or expired while it waited
            job.worker_id = seat.pod_id
            job.started_at = time.time()
            if self.faults.take("fail_next_runs"):
                self.finish(job, FAILED, error=EMULATED_FAILURE)
                continue
            job.status = IN_PROGRESS
            self.running.add(job.id)
            self.counters.max_in_progress = max(self.counters.max_in_progress, len(self.running))
            self._at(job, job.started_at + job.execution_timeout_s, self._timeout_reached)
            if self.faults.take("stuck_in_progress"):
                continue  # a worker that hung: only its timeout, a cancel or its ttl end it
            seat.hold(job.id)
            taken.append(job)
        if taken:
            seat.takes.append(len(taken))
        return taken

    def report(self, seat: Seat, job_id: str, result: dict[str, Any]) -> None:
        """A worker's job-done, as runpod-python's rp_job.run_job shapes it: {"output": ...} or
        {"error": ...} or both (a handler returning {"error": ..., **rest}); "stopPod" for refresh_worker."""
        job = self.jobs.get(job_id)
        if job is None or job.status != IN_PROGRESS or job.worker_id != seat.pod_id:
            # Cancelled, timed out, expired or reset before the worker finished: its answer is too late.
            log.info("job-done for %s from %s ignored: the job is no longer running there", job_id, seat.pod_id)
            return
        error = result.get("error")
        if error:
            self.finish(job, FAILED, output=result.get("output"), error=error)
        else:
            self.finish(job, COMPLETED, output=result.get("output"))

    def reconcile(self, seat: Seat, reported: list[str]) -> None:
        """A heartbeat listed the jobs the worker still runs (rp_ping.Heartbeat._send_ping's job_id).
        One that has ended here (cancelled, timed out, expired, reset) gets its stop signal again:
        a signal that reached the SDK between the take and the start of the job's task found no task
        to cancel (rp_scale.JobScaler.stop_job) and was lost."""
        for job_id in reported:
            job = self.jobs.get(job_id)
            if job is None or job.status != IN_PROGRESS or job.worker_id != seat.pod_id:
                seat.signal_stop(job_id)

    def add_stream(self, seat: Seat, job_id: str, partial: dict[str, Any]) -> None:
        job = self.jobs.get(job_id)
        if job is not None and job.status == IN_PROGRESS and job.worker_id == seat.pod_id:
            job.stream.append(partial.get("output"))

    def worker_gone(self, pod_id: str, reason: str) -> None:
        """A worker process ended: what it was running can no longer finish. RunPod documents no
        re-queue for this; its job-states page makes such a job TIMED_OUT once the execution timeout
        passes with no result. The emulator fails it at once instead, so the caller learns it now."""
        seat = self.seats.get(pod_id)
        for job in [j for j in self.jobs.values() if j.worker_id == pod_id and j.status == IN_PROGRESS]:
            self.finish(job, FAILED, error=f"worker {pod_id} {reason} while running the job")
        if seat is not None:
            seat.drop()

    # ---- endings

    def finish(self, job: Job, status: str, output: Any = None, error: Any = None) -> bool:
        if job.status in FINAL:
            return False  # a cancel or a timeout already settled it; the worker's view arrives second
        job.status, job.output, job.error = status, output, error
        job.finished_at = time.time()
        job.cancel_timers()
        self._release(job)
        job.done.set()
        if job.epoch == self.epoch:
            counter = FINAL_COUNTER[status]
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            self.on_final(job)
        return True

    def _release(self, job: Job) -> None:
        self.running.discard(job.id)
        seat = self.seats.get(job.worker_id or "")
        if seat is not None:
            seat.drop(job.id)

    def _stop_on_worker(self, job: Job) -> None:
        seat = self.seats.get(job.worker_id or "")
        if seat is not None:
            seat.signal_stop(job.id)

    def cancel(self, job: Job) -> None:
        if job.status == IN_QUEUE:
            self.finish(job, CANCELLED)  # its queue entry is skipped when reached
        elif job.status == IN_PROGRESS:
            self._stop_on_worker(job)
            self.finish(job, CANCELLED)

    def retry(self, job: Job) -> None:
        """/retry: a FAILED or TIMED_OUT job is queued again under the same id, its output dropped
        (job-operations "Retry a job")."""
        job.status, job.output, job.error, job.stream = IN_QUEUE, None, None, []
        job.started_at = job.finished_at = job.worker_id = None
        job.received_at = time.time()
        job.done = asyncio.Event()
        self.counters.retried += 1
        self._enqueue(job)

    def purge_queue(self, endpoint: str) -> int:
        """Deletes the endpoint's waiting jobs; running ones go on (operations: /purge-queue)."""
        queued = [job for job in self.jobs.values() if job.status == IN_QUEUE and job.endpoint == endpoint]
        for job in queued:
            job.cancel_timers()
            del self.jobs[job.id]
            job.done.set()
        return len(queued)

    def reset(self) -> None:
        self.epoch += 1
        for job in self.jobs.values():
            job.cancel_timers()
            if job.status == IN_PROGRESS:
                self._stop_on_worker(job)  # the worker drops it; its late job-done is ignored
        self.jobs.clear()
        self._queue.clear()
        self.running.clear()
        for seat in self.seats.values():
            seat.reset_counts()
        self.counters = Counters()

    def drain(self) -> None:
        """Shutting down: no job is handed out any more, and every long poll is answered now."""
        self.draining = True
        self._wake(everyone=True)
        for seat in self.seats.values():
            seat.release_polls()
