"""Workers inside the emulator's own event loop, for benchmarks (`--sleep-ms`) and `--in-process`.

They model what the real runtime does (runpod-python rp_scale.JobScaler) without its ~2 s of imports
per worker: each of `--workers` workers holds at most `--concurrency-modifier` jobs, asks for
exactly as many as it has free slots in one take (rp_job.get_job's job-take-batch), pauses
`--full-sleep-ms` when full (get_jobs sleeps 1 s there; 0 waits for a free slot instead), shapes
results like rp_job.run_job, and a stop signal cancels the job's task (JobScaler.stop_job).
"""

import asyncio
import copy
import functools
import importlib.util
import inspect
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.emulators.runpod.jobs import Board, Seat
from deploy.emulators.runpod.model import Config, Job, runpod_error_string

log = logging.getLogger("emulator.runpod")

Handler = Callable[[dict[str, Any]], Any]


def load_handler(path: str | Path) -> Handler:
    """Import the worker module the way RunPod's container would: its directory first on sys.path."""
    file = Path(path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"handler file not found: {file}")
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module  # sibling modules may import it back by name
    spec.loader.exec_module(module)
    handler = getattr(module, "handler", None)
    if not callable(handler):
        raise AttributeError(f"{file} defines no callable `handler`")
    return handler


def sleep_handler(sleep_ms: int) -> Handler:
    """Stand-in worker for benchmarks: costs only wall time."""

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(sleep_ms / 1000)
        return {"images": []}

    return handler


async def call_handler(handler: Handler, job: dict[str, Any]) -> Any:
    # Sync handlers go to a thread so they cannot stall the other workers (RunPod gives each its own box).
    if inspect.iscoroutinefunction(handler):
        return await handler(job)
    result = await asyncio.to_thread(handler, job)
    if inspect.isawaitable(result):
        result = await result
    return result


async def run_job(handler: Handler, job: dict[str, Any]) -> dict[str, Any]:
    """What runpod-python's rp_job.run_job posts to job-done for one handler call."""
    try:
        returned = await call_handler(handler, job)
    except Exception as exc:
        return {"error": runpod_error_string(exc)}
    if not isinstance(returned, dict):
        return {"output": returned}
    output = dict(returned)
    error = output.pop("error", None)
    refresh = output.pop("refresh_worker", None)
    result: dict[str, Any] = {"output": output} if output else {}
    if error:
        result["error"] = error
    if refresh:
        result["stopPod"] = True
    return result


class InProcessWorker:
    def __init__(self, board: Board, config: Config, handler: Handler, pod_id: str, concurrency: int) -> None:
        self.board = board
        self.config = config
        self.handler = handler
        self.concurrency = concurrency
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.seat = board.add_seat(pod_id, on_stop=self._stop_job)
        self.seat.seen_at = time.time()
        self._slot_freed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._get_jobs())

    def _stop_job(self, job_id: str) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            task.cancel()

    async def _get_jobs(self) -> None:
        while not (self.board.draining or self.seat.stopping):
            wanted = self.concurrency - len(self.tasks)
            if wanted <= 0:
                if self.config.full_sleep_ms > 0:
                    await asyncio.sleep(self.config.full_sleep_ms / 1000)
                else:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                continue
            for job in await self.board.take(self.seat, wanted, self.config.long_poll_seconds):
                task = asyncio.create_task(self._handle(job))
                self.tasks[job.id] = task
                task.add_done_callback(functools.partial(self._done, job.id))

    def _done(self, job_id: str, _: "asyncio.Task[None]") -> None:
        self.tasks.pop(job_id, None)
        self._slot_freed.set()

    async def _handle(self, job: Job) -> None:
        # A copy, so a handler that mutates its input cannot rewrite what the emulator reports.
        result = await run_job(self.handler, {"id": job.id, "input": copy.deepcopy(job.input)})
        self.board.report(self.seat, job.id, result)

    async def stop(self) -> None:
        tasks = [*self.tasks.values(), *filter(None, [self._loop_task])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class InProcessPool:
    def __init__(self, board: Board, config: Config, handler: Handler, workers: int, concurrency: int) -> None:
        self.workers = [
            InProcessWorker(board, config, handler, f"emulator-worker-{n}", concurrency) for n in range(workers)
        ]

    async def start(self, base_url: str) -> None:
        for worker in self.workers:
            worker.start()

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self.workers))

    def states(self) -> list[tuple[Seat, str]]:
        return [(w.seat, "running" if w.seat.held else "idle") for w in self.workers]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "pod_id": w.seat.pod_id,
                "pid": None,
                "state": state,
                "held": len(w.seat.held),
                "busy_seconds": round(w.seat.busy_seconds(), 3),
            }
            for w, (_, state) in zip(self.workers, self.states(), strict=True)
        ]

    def signal(self, pod_id: str, signame: str) -> bool:
        return False  # no process to signal
