"""RunPod Serverless emulator: the real REST paths and JSON shapes, running the real worker handler.

RunPod's own `--rp_serve_api` is not the production API (no async /run, no cancel/health, webhooks only
on success), so the stack and its tests talk to this instead. It keeps everything in memory: a FIFO queue,
exactly `--workers` concurrent workers (asyncio tasks), statuses that expire like RunPod's, webhooks with
RunPod's retry rule, and `/_emulator/*` routes to read counters and inject faults.

    python -m deploy.emulators.runpod --port 8100 --workers 3 --handler worker/handler.py
"""

import argparse
import asyncio
import contextlib
import copy
import importlib.util
import inspect
import json
import logging
import random
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import ClientError, ClientSession, ClientTimeout, web

log = logging.getLogger("emulator.runpod")

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

RUN_LIMIT_BYTES = 10 * 1024 * 1024
RUNSYNC_LIMIT_BYTES = 20 * 1024 * 1024
DEFAULT_TTL_MS = 24 * 3600 * 1000
WEBHOOK_ATTEMPTS = 3  # the first POST plus RunPod's 2 retries
WEBHOOK_TIMEOUT = ClientTimeout(total=10)
RUNSYNC_DEFAULT_WAIT_MS = 90_000
EMULATED_FAILURE = "emulated worker failure"

Handler = Callable[[dict[str, Any]], Any]


# --------------------------------------------------------------------------------------------- state


@dataclass
class Config:
    workers: int = 3
    api_key: str | None = None
    webhook_retry_delay: float = 10.0
    execution_timeout_ms: int = 600_000
    result_ttl_seconds: float = 1800.0


@dataclass
class Faults:
    fail_next_runs: int = 0
    drop_webhooks: float = 0.0
    duplicate_webhooks: float = 0.0
    webhook_delay_ms: int = 0
    run_answer_delay_ms: int = 0  # /run queues the job at once but answers this much later
    run_http_429: int = 0
    run_http_500: int = 0
    status_http_429: int = 0
    status_http_500: int = 0
    stuck_in_progress: int = 0
    expire_results: bool = False

    def update(self, changes: dict[str, Any]) -> None:
        """Validate everything first so a bad request changes nothing."""
        kinds = {f.name: f.type for f in fields(self)}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown fault {name!r}")
            checked[name] = _check_fault_value(name, kind, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def take(self, name: str) -> bool:
        """Consume one unit of a countdown fault; True when it fires."""
        left: int = getattr(self, name)
        if left <= 0:
            return False
        setattr(self, name, left - 1)
        return True


def _check_fault_value(name: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability between 0 and 1")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer")
    return value


@dataclass
class Counters:
    max_in_progress: int = 0
    runs_received: int = 0
    max_run_body_bytes: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    webhooks_sent: int = 0
    webhooks_dropped: int = 0
    webhooks_failed: int = 0
    cancel_calls: int = 0


_FINAL_COUNTER = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled", TIMED_OUT: "timed_out"}


@dataclass(eq=False)
class Job:
    id: str
    endpoint: str
    input: Any
    webhook: str | None
    execution_timeout_s: float
    ttl_s: float
    epoch: int
    received_at: float = field(default_factory=time.time)
    status: str = IN_QUEUE
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    output: Any = None
    error: Any = None
    task: "asyncio.Task[Any] | None" = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def status_body(self) -> dict[str, Any]:
        now = time.time()
        queued_until = self.started_at or self.finished_at or now
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "delayTime": _ms(queued_until - self.received_at),
            "executionTime": _ms((self.finished_at or now) - self.started_at) if self.started_at else 0,
        }
        if self.worker_id is not None:
            body["workerId"] = self.worker_id
        if self.status == COMPLETED or self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "input": self.input,
            "received_at": self.received_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "webhook": self.webhook,
        }


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


# --------------------------------------------------------------------------------------------- handler


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


def runpod_error_string(exc: BaseException) -> str:
    """The JSON string runpod-python's run_job reports for a raising handler."""
    return json.dumps(
        {
            "error_type": str(type(exc)),
            "error_message": str(exc),
            "error_traceback": "".join(traceback.format_exception(exc)),
            "hostname": "emulator",
            "worker_id": "emulator",
            "runpod_version": "emulator",
        }
    )


# --------------------------------------------------------------------------------------------- core


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Emulator:
    def __init__(self, config: Config, handler: Handler, faults: Faults | None = None) -> None:
        self.config = config
        self.handler = handler
        self.faults = faults or Faults()
        self.counters = Counters()
        self.jobs: dict[str, Job] = {}
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.running: set[str] = set()
        # Bumped by reset so jobs from before it cannot touch the fresh counters.
        self.epoch = 0
        self._workers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper_task: asyncio.Task[None] | None = None
        self._http: ClientSession | None = None

    # ---- lifecycle

    async def start(self) -> None:
        self._http = ClientSession(timeout=WEBHOOK_TIMEOUT)
        self._workers = [asyncio.create_task(self._worker(f"emulator-worker-{n}")) for n in range(self.config.workers)]
        self._sweeper_task = asyncio.create_task(self._sweeper())

    async def stop(self) -> None:
        tasks = [*self._workers, *self._background, *filter(None, [self._sweeper_task])]
        tasks += [job.task for job in self.jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)  # keeps a reference, or the loop may garbage-collect it mid-flight
        task.add_done_callback(self._background.discard)

    # ---- submission and lookup

    def submit(self, endpoint: str, raw: bytes, limit: int) -> Job:
        body = _parse_body(raw, limit)
        policy = _parse_policy(body.get("policy"), self.config.execution_timeout_ms)
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise ApiError(400, "webhook must be a string")
        job = Job(
            id=f"{uuid.uuid4()}-e1",
            endpoint=endpoint,
            input=body["input"],
            webhook=webhook or None,
            execution_timeout_s=policy[0],
            ttl_s=policy[1],
            epoch=self.epoch,
        )
        self.jobs[job.id] = job
        self.queue.put_nowait(job)
        return job

    def lookup(self, endpoint: str, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is None or job.endpoint != endpoint:
            return None
        if self._expired(job, time.time()):
            self.jobs.pop(job_id, None)
            return None
        return job

    def _expired(self, job: Job, now: float) -> bool:
        if job.finished_at is not None:
            return now > job.finished_at + self.config.result_ttl_seconds
        # RunPod drops a job still waiting when its policy ttl runs out.
        return job.status == IN_QUEUE and now > job.received_at + job.ttl_s

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, max(0.5, self.config.result_ttl_seconds / 4)))
            now = time.time()
            for job_id in [j.id for j in self.jobs.values() if self._expired(j, now)]:
                del self.jobs[job_id]  # a queued one left behind is skipped by the worker: not in jobs

    # ---- execution

    async def _worker(self, worker_id: str) -> None:
        while True:
            job = await self.queue.get()
            if job.status != IN_QUEUE or job.epoch != self.epoch or job.id not in self.jobs:
                continue  # cancelled, purged, reset or expired while it waited
            if self._expired(job, time.time()):
                self.jobs.pop(job.id, None)
                continue
            await self._process(job, worker_id)

    async def _process(self, job: Job, worker_id: str) -> None:
        job.worker_id = worker_id
        job.started_at = time.time()
        if self.faults.take("fail_next_runs"):
            self._finish(job, FAILED, error=EMULATED_FAILURE)
            return
        job.status = IN_PROGRESS
        self.running.add(job.id)
        self.counters.max_in_progress = max(self.counters.max_in_progress, len(self.running))
        stuck = self.faults.take("stuck_in_progress")
        task = job.task = asyncio.create_task(self._execute(job, stuck))
        deadline = job.started_at + job.execution_timeout_s
        try:
            # uvloop's millisecond timers can wake a little early; the timeout is a wall-clock promise.
            done: set[asyncio.Task[Any]] = set()
            while not done and (left := deadline - time.time()) > 0:
                done, _ = await asyncio.wait({task}, timeout=left)
        finally:
            self.running.discard(job.id)
        if not done:
            task.cancel()
            self._finish(job, TIMED_OUT)
        else:
            self._settle(job, task)

    async def _execute(self, job: Job, stuck: bool) -> Any:
        if stuck:
            await asyncio.Event().wait()  # never set: only the execution timeout or a cancel ends it
        # A copy, so a handler that mutates its input cannot rewrite what the emulator reports.
        return await call_handler(self.handler, {"id": job.id, "input": copy.deepcopy(job.input)})

    def _settle(self, job: Job, task: "asyncio.Task[Any]") -> None:
        if task.cancelled():
            self._finish(job, CANCELLED)
            return
        exc = task.exception()
        if exc is not None:
            self._finish(job, FAILED, error=runpod_error_string(exc))
            return
        result = task.result()
        if isinstance(result, dict) and result.get("error"):
            rest = {k: v for k, v in result.items() if k != "error"}
            self._finish(job, FAILED, output=rest or None, error=result["error"])
            return
        self._finish(job, COMPLETED, output=result)

    def _finish(self, job: Job, status: str, output: Any = None, error: Any = None) -> None:
        if job.status in FINAL:
            return  # a cancel already settled it; the worker's view arrives second
        job.status, job.output, job.error = status, output, error
        job.finished_at = time.time()
        self.running.discard(job.id)
        job.done.set()
        if job.epoch != self.epoch:
            return
        counter = _FINAL_COUNTER[status]
        setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        if job.webhook:
            self._spawn(self._deliver_webhook(job))

    def cancel(self, job: Job) -> None:
        if job.status not in (IN_QUEUE, IN_PROGRESS):
            return
        task = job.task
        self._finish(job, CANCELLED)
        if task is not None:
            task.cancel()

    def purge_queue(self) -> int:
        queued = [job for job in self.jobs.values() if job.status == IN_QUEUE]
        for job in queued:
            job.status = CANCELLED  # the worker skips it when it reaches the head of the queue
            self.jobs.pop(job.id, None)
        return len(queued)

    # ---- webhooks

    async def _deliver_webhook(self, job: Job) -> None:
        url = job.webhook
        if url is None:
            return
        if random.random() < self.faults.drop_webhooks:
            self.counters.webhooks_dropped += 1
            return
        copies = 2 if random.random() < self.faults.duplicate_webhooks else 1
        if self.faults.webhook_delay_ms:
            await asyncio.sleep(self.faults.webhook_delay_ms / 1000)
        body = {**job.status_body(), "input": job.input, "webhook": url}
        for _ in range(copies):
            await self._post_webhook(url, body)

    async def _post_webhook(self, url: str, body: dict[str, Any]) -> None:
        assert self._http is not None
        for attempt in range(WEBHOOK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(self.config.webhook_retry_delay)
            self.counters.webhooks_sent += 1
            try:
                async with self._http.post(url, json=body) as resp:
                    if resp.status == 200:  # RunPod retries anything else, 2xx included
                        return
                    log.warning("webhook for %s answered %s", body["id"], resp.status)
            except (ClientError, TimeoutError) as exc:
                log.warning("webhook for %s failed: %s", body["id"], type(exc).__name__)
        self.counters.webhooks_failed += 1

    # ---- test support

    def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.counters),
            "in_progress": len(self.running),
            "in_queue": self._count(IN_QUEUE),
        }

    def _count(self, status: str) -> int:
        return sum(1 for job in self.jobs.values() if job.status == status)

    def reset(self) -> None:
        self.epoch += 1
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        while not self.queue.empty():
            self.queue.get_nowait()
        for task in list(self._background):  # pending webhooks of the old epoch
            task.cancel()
        self.jobs.clear()
        self.running.clear()
        self.counters = Counters()

    def health(self) -> dict[str, Any]:
        running = len(self.running)
        return {
            "jobs": {
                "completed": self.counters.completed,
                "failed": self.counters.failed,
                "inProgress": running,
                "inQueue": self._count(IN_QUEUE),
                "retried": 0,
            },
            "workers": {
                "idle": self.config.workers - running,
                "running": running,
                "initializing": 0,
                "ready": self.config.workers - running,
                "throttled": 0,
                "unhealthy": 0,
            },
        }


def _parse_body(raw: bytes, limit: int) -> dict[str, Any]:
    if len(raw) > limit:
        raise ApiError(400, f"request body too large: {len(raw)} bytes, limit {limit}")
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict) or "input" not in body:
        raise ApiError(400, "request body must be a JSON object with an 'input' field")
    return body


def _parse_policy(policy: Any, default_timeout_ms: int) -> tuple[float, float]:
    """(execution timeout, ttl) in seconds from RunPod's millisecond policy."""
    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise ApiError(400, "policy must be an object")
    timeout_ms = policy.get("executionTimeout", default_timeout_ms)
    ttl_ms = policy.get("ttl", DEFAULT_TTL_MS)
    for name, value in (("executionTimeout", timeout_ms), ("ttl", ttl_ms)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ApiError(400, f"policy.{name} must be a positive number of milliseconds")
    return timeout_ms / 1000, ttl_ms / 1000


# --------------------------------------------------------------------------------------------- HTTP

EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator", Emulator)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _emulator(request: web.Request) -> Emulator:
    return request.app[EMULATOR_KEY]


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/v2/") and not _authorized(request):
        return _error(401, "Unauthorized")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)


def _authorized(request: web.Request) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    expected = _emulator(request).config.api_key
    return expected is None or key == expected


async def run_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    emulator.counters.runs_received += 1
    raw = await request.read()
    emulator.counters.max_run_body_bytes = max(emulator.counters.max_run_body_bytes, len(raw))
    if emulator.faults.take("run_http_429"):
        return _error(429, "Too Many Requests")
    if emulator.faults.take("run_http_500"):
        return _error(500, "Internal Server Error")
    job = emulator.submit(request.match_info["endpoint"], raw, RUN_LIMIT_BYTES)
    answer = {"id": job.id, "status": job.status}
    if emulator.faults.run_answer_delay_ms:
        await asyncio.sleep(emulator.faults.run_answer_delay_ms / 1000)
    return web.json_response(answer)


async def runsync_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    job = emulator.submit(request.match_info["endpoint"], await request.read(), RUNSYNC_LIMIT_BYTES)
    wait_ms = _int_query(request, "wait", RUNSYNC_DEFAULT_WAIT_MS)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(job.done.wait(), timeout=min(wait_ms, 300_000) / 1000)
    return web.json_response(job.status_body())


def _int_query(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


async def status_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    if emulator.faults.take("status_http_429"):
        return _error(429, "Too Many Requests")
    if emulator.faults.take("status_http_500"):
        return _error(500, "Internal Server Error")
    job = emulator.lookup(request.match_info["endpoint"], request.match_info["job_id"])
    if job is None or (emulator.faults.expire_results and job.status in FINAL):
        return _error(404, "job not found")
    return web.json_response(job.status_body())


async def cancel_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    emulator.counters.cancel_calls += 1
    job = emulator.lookup(request.match_info["endpoint"], request.match_info["job_id"])
    if job is None:
        return _error(404, "job not found")
    emulator.cancel(job)
    return web.json_response({"id": job.id, "status": job.status})


async def health_route(request: web.Request) -> web.Response:
    return web.json_response(_emulator(request).health())


async def purge_route(request: web.Request) -> web.Response:
    return web.json_response({"removed": _emulator(request).purge_queue(), "status": "completed"})


async def stats_route(request: web.Request) -> web.Response:
    return web.json_response(_emulator(request).stats())


async def jobs_route(request: web.Request) -> web.Response:
    jobs = sorted(_emulator(request).jobs.values(), key=lambda job: job.received_at)
    return web.json_response([job.record() for job in jobs])


async def reset_route(request: web.Request) -> web.Response:
    _emulator(request).reset()
    return web.json_response({"ok": True})


async def faults_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    if request.method == "POST":
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("faults must be a JSON object")
            emulator.faults.update(changes)
        except ValueError as exc:
            return _error(400, str(exc))
    return web.json_response(asdict(emulator.faults))


async def faults_clear_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    emulator.faults = Faults()
    return web.json_response(asdict(emulator.faults))


def create_app(emulator: Emulator) -> web.Application:
    # Large enough to read an oversized body and answer RunPod's 400, not aiohttp's bare 413.
    app = web.Application(middlewares=[api_middleware], client_max_size=2 * RUNSYNC_LIMIT_BYTES)
    app[EMULATOR_KEY] = emulator
    prefix = "/v2/{endpoint}"
    app.router.add_post(f"{prefix}/run", run_route)
    app.router.add_post(f"{prefix}/runsync", runsync_route)
    app.router.add_get(f"{prefix}/status/{{job_id}}", status_route)
    app.router.add_post(f"{prefix}/status/{{job_id}}", status_route)
    app.router.add_post(f"{prefix}/cancel/{{job_id}}", cancel_route)
    app.router.add_get(f"{prefix}/health", health_route)
    app.router.add_post(f"{prefix}/purge-queue", purge_route)
    app.router.add_get("/_emulator/stats", stats_route)
    app.router.add_get("/_emulator/jobs", jobs_route)
    app.router.add_post("/_emulator/reset", reset_route)
    app.router.add_get("/_emulator/faults", faults_route)
    app.router.add_post("/_emulator/faults", faults_route)
    app.router.add_post("/_emulator/faults/clear", faults_clear_route)

    async def on_startup(_: web.Application) -> None:
        await emulator.start()

    async def on_cleanup(_: web.Application) -> None:
        await emulator.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


# --------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--api-key", default=None, help="required Bearer key; any non-empty key if unset")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--handler", help="worker file defining `handler(job)`, e.g. worker/handler.py")
    work.add_argument("--sleep-ms", type=int, help="no handler: each job sleeps this long (default 200)")
    parser.add_argument("--webhook-retry-delay", type=float, default=10.0, help="seconds between attempts")
    parser.add_argument("--execution-timeout-ms", type=int, default=600_000, help="when policy has none")
    parser.add_argument("--result-ttl-seconds", type=float, default=1800.0)
    parser.add_argument("--drop-webhooks", type=float, default=0.0, help="probability a webhook is lost")
    parser.add_argument("--duplicate-webhooks", type=float, default=0.0, help="probability one is sent twice")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def build(args: argparse.Namespace) -> Emulator:
    sleep_ms = 200 if args.sleep_ms is None else args.sleep_ms
    handler = load_handler(args.handler) if args.handler else sleep_handler(sleep_ms)
    config = Config(
        workers=args.workers,
        api_key=args.api_key or None,
        webhook_retry_delay=args.webhook_retry_delay,
        execution_timeout_ms=args.execution_timeout_ms,
        result_ttl_seconds=args.result_ttl_seconds,
    )
    faults = Faults()
    faults.update({"drop_webhooks": args.drop_webhooks, "duplicate_webhooks": args.duplicate_webhooks})
    return Emulator(config, handler, faults)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    emulator = build(args)
    log.info("RunPod emulator on http://%s:%s/v2 with %d workers", args.host, args.port, args.workers)
    # uvloop: the emulator stands in for RunPod's capacity, so its own overhead per run should be
    # as small as we can make it (benchmark 1 measures against it).
    web.run_app(
        create_app(emulator), host=args.host, port=args.port, print=None, access_log=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
