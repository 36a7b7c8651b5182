"""Worker processes running the real runpod SDK: `python <handler file>`, as RunPod's container does.

Each gets the environment RunPod gives a serverless worker (runpod-python's worker_state.py,
rp_job.py, rp_http.py, rp_ping.py read it): RUNPOD_WEBHOOK_GET_JOB, RUNPOD_WEBHOOK_POST_OUTPUT,
RUNPOD_WEBHOOK_POST_STREAM, RUNPOD_WEBHOOK_PING pointing at this emulator, RUNPOD_POD_ID (one per
worker), RUNPOD_POD_HOSTNAME, RUNPOD_AI_API_KEY (the key its job API checks), RUNPOD_ENDPOINT_ID; and
the emulator's own environment (GEMINI_BASE_URL, GEMINI_API_KEY, WORKER_CONCURRENCY ...). The handler's
`__main__` calls runpod.serverless.start, so the SDK's own loop takes the jobs: capacity is
workers x concurrency_modifier, batches and the 1 s pause when full come from rp_scale.JobScaler.

RUNPOD_SKIP_AUTO_SYSTEM_CHECKS and RUNPOD_SKIP_GPU_CHECK default to true: the SDK's automatic fitness
checks (rp_system_fitness.py: 4 GB free memory, a TCP connection to 8.8.8.8, a GPU) test the machine
RunPod rents out, not the worker, and fail on an offline CI box. Checks the handler registers itself
(runpod.serverless.register_fitness_check) still run: one that fails exits the worker (rp_fitness.py,
os._exit(1)) after reporting `status=unhealthy` on the ping URL.

A worker that exits on its own (failed fitness check, crash) is counted unhealthy and its running
jobs fail (jobs.Board.worker_gone); one that exits after a `refresh_worker` result is replaced, as
RunPod refreshes it. On stop: SIGTERM (the SDK finishes its in-flight jobs, rp_scale.handle_shutdown),
then SIGKILL once a worker holds no job, or after the grace. Workers share the emulator's process
group, so whoever stops the emulator's group stops them too, and PR_SET_PDEATHSIG sends them SIGTERM
if the emulator dies alone.
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.emulators.runpod.jobs import Board, Seat

log = logging.getLogger("emulator.runpod")
worker_log = logging.getLogger("emulator.runpod.worker")

PR_SET_PDEATHSIG = 1
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT}
QUIET_DEFAULTS = {
    "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
    "RUNPOD_SKIP_GPU_CHECK": "true",
    # The SDK logs at DEBUG by default (rp_logger.py), a line per loop turn of every worker.
    "RUNPOD_LOG_LEVEL": "INFO",
    # Heartbeats each second (RunPod: 10 s; the SDK's floor is 1 s, rp_ping.py divides by 1000):
    # the jobs they list let a stop signal that came too early be sent again (jobs.Board.reconcile).
    "RUNPOD_PING_INTERVAL": "1000",
}

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_urls(base_url: str, endpoint_id: str) -> dict[str, str]:
    """The worker API URLs in RunPod's form: `$ID` and `$RUNPOD_POD_ID` are filled in by the SDK,
    which appends `&...` parameters, so each carries a query string already (as RunPod's `?gpu=`)."""
    v2 = f"{base_url}/v2/{endpoint_id}"
    return {
        "RUNPOD_WEBHOOK_GET_JOB": f"{v2}/job-take/$ID?gpu=emulator",
        "RUNPOD_WEBHOOK_POST_OUTPUT": f"{v2}/job-done/$RUNPOD_POD_ID/$ID?gpu=emulator",
        "RUNPOD_WEBHOOK_POST_STREAM": f"{v2}/job-stream/$RUNPOD_POD_ID/$ID?gpu=emulator",
        "RUNPOD_WEBHOOK_PING": f"{v2}/ping/$RUNPOD_POD_ID?gpu=emulator",
    }


@dataclass(eq=False)
class WorkerProcess:
    index: int
    pod_id: str
    seat: Seat
    process: asyncio.subprocess.Process | None = None
    started_at: float = field(default_factory=time.time)
    exit_code: int | None = None
    unhealthy_reason: str | None = None  # from a fitness check's ping, or how it exited
    refresh: bool = False  # its last result asked for refresh_worker: replace it when it exits
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.exit_code is not None:
            return "stopped" if self.seat.stopping else "unhealthy"
        if self.seat.seen_at is None:
            return "initializing"
        return "running" if self.seat.held else "idle"


class ProcessPool:
    def __init__(
        self, board: Board, handler: Path, count: int, endpoint_id: str, worker_key: str, grace_s: float
    ) -> None:
        self.board = board
        self.handler = handler.resolve()
        self.count = count
        self.endpoint_id = endpoint_id
        self.worker_key = worker_key
        self.grace_s = grace_s
        # Registered before they start, so /health counts them initializing from the first request.
        self.workers = [self._record(index) for index in range(count)]
        self._urls: dict[str, str] = {}
        self._stopping = False

    def _record(self, index: int) -> WorkerProcess:
        pod_id = f"worker-{index}-{secrets.token_hex(4)}"
        return WorkerProcess(index, pod_id, self.board.add_seat(pod_id))

    async def start(self, base_url: str) -> None:
        """Spawn every worker now; their imports run concurrently while the API already answers
        (jobs wait IN_QUEUE until a worker takes them)."""
        self._urls = worker_urls(base_url, self.endpoint_id)
        for worker in list(self.workers):
            await self._spawn(worker)

    async def _spawn(self, worker: WorkerProcess) -> None:
        env = {**QUIET_DEFAULTS, **os.environ, **self._urls}
        env.update(
            RUNPOD_POD_ID=worker.pod_id,
            RUNPOD_POD_HOSTNAME=f"{worker.pod_id}-emulator",
            RUNPOD_AI_API_KEY=self.worker_key,
            RUNPOD_ENDPOINT_ID=self.endpoint_id,
            PYTHONUNBUFFERED="1",
        )
        worker.started_at = time.time()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.handler),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.info("worker %s started (pid %s): %s", worker.pod_id, worker.process.pid, self.handler)
        worker.tasks = [asyncio.create_task(self._pump(worker)), asyncio.create_task(self._watch(worker))]

    async def _pump(self, worker: WorkerProcess) -> None:
        assert worker.process is not None and worker.process.stdout is not None
        with contextlib.suppress(ValueError):  # a line longer than the stream's limit ends the copy
            async for line in worker.process.stdout:
                worker_log.info("[%s] %s", worker.pod_id, line.decode(errors="replace").rstrip())

    async def _watch(self, worker: WorkerProcess) -> None:
        # uvloop's wait() returns at the exit even while the SDK's heartbeat child keeps stdout open.
        assert worker.process is not None
        code = await worker.process.wait()
        worker.exit_code = code
        _kill_pod_leftovers(worker.pod_id)  # its heartbeat process, orphaned by a crash
        how = f"exited with code {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
        self.board.worker_gone(worker.pod_id, how)
        if worker.refresh and not self._stopping:
            log.info("worker %s %s after refresh_worker: starting a fresh one", worker.pod_id, how)
            fresh = self._record(worker.index)
            self.workers.append(fresh)
            await self._spawn(fresh)
        elif self._stopping or worker.seat.stopping:
            log.info("worker %s %s", worker.pod_id, how)
        else:
            worker.unhealthy_reason = worker.unhealthy_reason or how
            log.warning("worker %s %s: unhealthy (%s)", worker.pod_id, how, worker.unhealthy_reason)

    def find(self, pod_id: str) -> WorkerProcess | None:
        return next((w for w in self.workers if w.pod_id == pod_id), None)

    def signal(self, pod_id: str, signame: str) -> bool:
        worker = self.find(pod_id)
        if worker is None or worker.process is None or worker.exit_code is not None:
            return False
        if SIGNALS[signame] == signal.SIGTERM:
            self.board.stop_seat(worker.seat)  # RunPod scaling a worker down: no more jobs for it
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(SIGNALS[signame])
        return True

    async def stop(self) -> None:
        """SIGTERM every worker; kill it once it holds no job (the SDK has finished and reported
        what it was running; unwinding its long polls would only add a second, rp_scale's floor
        delay after an empty job-stop answer), or after the grace if it still holds one."""
        self._stopping = True
        alive = [w for w in self.workers if w.exit_code is None and w.process is not None]
        for worker in alive:
            self.board.stop_seat(worker.seat)
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.grace_s
        while busy := [w for w in alive if w.exit_code is None and w.seat.held]:
            if (left := deadline - time.monotonic()) <= 0:
                for worker in busy:
                    log.warning(
                        "worker %s still running jobs %.1f s after SIGTERM: killed", worker.pod_id, self.grace_s
                    )
                break
            await asyncio.wait([asyncio.shield(w.tasks[1]) for w in busy], timeout=min(left, 0.05))
        for worker in alive:
            if worker.exit_code is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()  # type: ignore[union-attr]
        if alive:
            await asyncio.wait([asyncio.shield(w.tasks[1]) for w in alive], timeout=5)
        for worker in self.workers:
            _kill_pod_leftovers(worker.pod_id)
            for task in worker.tasks:
                task.cancel()
        await asyncio.gather(*(t for w in self.workers for t in w.tasks), return_exceptions=True)

    def states(self) -> list[tuple[Seat, str]]:
        return [(w.seat, w.state) for w in self.workers]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "pod_id": w.pod_id,
                "pid": w.process.pid if w.process else None,
                "state": w.state,
                "held": len(w.seat.held),
                "max_held": w.seat.max_held,
                "busy_seconds": round(w.seat.busy_seconds(), 3),
                "takes": list(w.seat.takes),
                "exit_code": w.exit_code,
                "unhealthy_reason": w.unhealthy_reason,
                "last_ping": w.seat.last_ping,
            }
            for w in self.workers
        ]

    def note_unhealthy(self, pod_id: str, reason: str) -> None:
        worker = self.find(pod_id)
        if worker is not None:
            worker.unhealthy_reason = reason
            log.warning("worker %s reports itself unhealthy: %s", pod_id, reason)

    def note_refresh(self, pod_id: str) -> None:
        """A result carried stopPod (refresh_worker, rp_job.run_job): RunPod stops that worker once
        the job is done and starts a fresh one; the SDK itself only exits when refresh_worker is set
        in its start() config (rp_scale.JobScaler.handle_job)."""
        worker = self.find(pod_id)
        if worker is not None and not worker.refresh:
            worker.refresh = True
            self.signal(pod_id, "SIGTERM")


def _kill_pod_leftovers(pod_id: str) -> None:
    """SIGKILL every process of this worker still alive (found by the RUNPOD_POD_ID in its
    environment): the SDK's heartbeat runs in a child process (rp_ping.Heartbeat) that outlives a
    worker killed or crashed without the SDK's own cleanup."""
    marker = f"RUNPOD_POD_ID={pod_id}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry.name}/environ", "rb") as env:
                if marker in env.read().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
