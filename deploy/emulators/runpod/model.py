"""What the emulator knows about a job, its settings, its counters and its injectable faults.

Statuses and the /status body follow https://docs.runpod.io/serverless/references/job-states and
https://docs.runpod.io/serverless/endpoints/job-operations (`delayTime`, `executionTime`, `workerId`,
`output`, `error`); RUNNING is documented but never returned, so it never appears here.
"""

import asyncio
import json
import time
import traceback
from dataclasses import dataclass, field, fields
from typing import Any

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
FINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

# https://docs.runpod.io/serverless/references/operations: payload limits of /run and /runsync.
RUN_LIMIT_BYTES = 10 * 1024 * 1024
RUNSYNC_LIMIT_BYTES = 20 * 1024 * 1024
# The policy's bounds and defaults (job-operations "Execution policies"): executionTimeout 5 s - 7 d
# (default 10 min), ttl 10 s - 7 d (default 24 h).
SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
MIN_EXECUTION_TIMEOUT_MS = 5_000
MIN_TTL_MS = 10_000
DEFAULT_EXECUTION_TIMEOUT_MS = 600_000
DEFAULT_TTL_MS = 24 * 3600 * 1000
# Results of /run are kept 30 min after completion, of /runsync 1 min (job-operations "Job availability").
RUN_RESULT_TTL_S = 1800.0
RUNSYNC_RESULT_TTL_S = 60.0
EMULATED_FAILURE = "emulated worker failure"


@dataclass
class Config:
    """Settings a test may change at run time through POST /_emulator/config (limits live in limits.py)."""

    api_key: str | None = None
    webhook_retry_delay: float = 10.0
    execution_timeout_ms: int = DEFAULT_EXECUTION_TIMEOUT_MS  # when a request's policy has none
    result_ttl_seconds: float = RUN_RESULT_TTL_S
    runsync_result_ttl_seconds: float = RUNSYNC_RESULT_TTL_S
    # RunPod's lower policy bounds; tests lower them to see a timeout or a ttl in a second, not in 10.
    min_execution_timeout_ms: int = MIN_EXECUTION_TIMEOUT_MS
    min_ttl_ms: int = MIN_TTL_MS
    # How long job-take and job-stop hold a worker's request open before answering 204.
    long_poll_seconds: float = 5.0
    # In-process workers: the pause of rp_scale.JobScaler.get_jobs when a worker is full (1 s there).
    full_sleep_ms: int = 1000

    def update(self, changes: dict[str, Any]) -> None:
        """Validate everything first so a bad request changes nothing."""
        kinds: dict[str, type] = {f.name: type(getattr(self, f.name)) for f in fields(self) if f.name != "api_key"}
        checked: dict[str, Any] = {}
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown setting {name!r}")
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a non-negative number")
            if kind is int and not isinstance(value, int):
                raise ValueError(f"{name} must be an integer")
            checked[name] = kind(value)
        for name, value in checked.items():
            setattr(self, name, value)

    def public(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}


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
    status_http_405: int = 0
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
    expired: int = 0  # deleted at their policy ttl, queued or running
    retried: int = 0
    webhooks_sent: int = 0
    webhooks_dropped: int = 0
    webhooks_failed: int = 0
    cancel_calls: int = 0


FINAL_COUNTER = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled", TIMED_OUT: "timed_out"}


@dataclass(eq=False)
class Job:
    id: str
    endpoint: str
    input: Any
    webhook: str | None
    execution_timeout_s: float
    ttl_s: float
    result_ttl_s: float
    epoch: int
    received_at: float = field(default_factory=time.time)
    status: str = IN_QUEUE
    started_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    output: Any = None
    error: Any = None
    stream: list[Any] = field(default_factory=list)  # generator handlers' partial outputs, not yet read
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

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
            "worker_id": self.worker_id,
            "webhook": self.webhook,
        }

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def runpod_error_string(exc: BaseException) -> str:
    """The JSON string runpod-python's rp_job.run_job reports for a raising handler."""
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


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
