"""What the stores read and write: job, image and run records as Redis holds them, and the value
types their calls take and give. No Redis calls here."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel

from shared import keys
from shared.budgets import period_end, period_id
from shared.models import ImageStatus, JobStatus, RunStatus
from shared.pricing import RunCost, usd

# score = priority * scale + sequence: lower runs sooner, first in first out among equals.
# 2**32 keeps every score within the 14 digits Lua prints exactly.
PRIORITY_SCALE = 2**32


class JobRecord(BaseModel):
    id: str
    project: str
    mode: str
    lane: str = "realtime"
    group: str
    group_id: str | None = None
    priority: int
    seq: int = 0
    status: JobStatus
    images_total: int
    runs_total: int
    runs_started: int = 0
    runs_done: int = 0
    images_succeeded: int = 0
    images_failed: int = 0
    tokens: int = 0
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    zip_key: str | None = None
    zip_bytes: int | None = None
    retry_of: str | None = None
    retried_by: str | None = None
    webhook_url: str | None = None
    batch_id: str | None = None  # the saved batch it was queued from (/api/batches)
    # What its recorded run attempts cost (complete_run.lua adds each one's): tokens Gemini
    # reported, Gemini's price for them and RunPod's execution time and its price, in micro-USD.
    prompt_tokens: int = 0
    output_tokens: int = 0
    gemini_micros: int = 0
    runpod_ms: int = 0
    runpod_micros: int = 0

    def cost(self) -> dict[str, Any]:
        """Its recorded cost as the API, the console and the manifest show it (USD)."""
        return {
            "lane": self.lane,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "gemini_usd": usd(self.gemini_micros),
            "runpod_seconds": round(self.runpod_ms / 1000, 3),
            "runpod_usd": usd(self.runpod_micros),
            "total_usd": usd(self.gemini_micros + self.runpod_micros),
        }


# The job hash's fields a JobRecord is read from, in this order (HMGET).
JOB_FIELDS = list(JobRecord.model_fields)


class ImageRecord(BaseModel):
    """The outcome of one image slot's latest attempt (stored as JSON in the job's images hash)."""

    status: ImageStatus
    attempt: int
    object_key: str | None = None
    mime_type: str | None = None
    bytes: int | None = None
    crc32: int | None = None
    error: str | None = None
    detail: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finished_at: float


class RunRecord(BaseModel):
    job_id: str
    project: str
    attempt: int
    status: RunStatus
    runpod_id: str = ""
    # Names the latest claim of the run (shared/lua/record_started_and_claim.lua): what was started
    # under another name is not this run's current execution.
    claim: str = ""
    dispatched_at: float | None = None
    last_error: str | None = None
    slots: str | None = None  # redo runs only: "3,7"


def present(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields that hold a value: Redis stores an absent one as missing or ''."""
    return {k: v for k, v in raw.items() if v is not None and v != ""}


def job_record(values: Sequence[str | None]) -> JobRecord | None:
    """A JobRecord from the values of JOB_FIELDS, in order (None when the job does not exist)."""
    if values[0] is None:
        return None
    fields = present(dict(zip(JOB_FIELDS, values, strict=True)))
    if "zip_bytes" in fields and "zip_key" not in fields:
        # Not stored: derived from the id, a value that long would cost the hash its compact encoding.
        fields["zip_key"] = keys.zip_object(fields["id"])
    return JobRecord.model_validate(fields)


class ClaimedRun(NamedTuple):
    """A run claimed to start: its attempt, and the claim's own name."""

    run_id: str
    attempt: int
    claim: str


@dataclass(frozen=True, slots=True)
class StartedRun:
    """A claimed run RunPod accepted, as the id RunPod gave it."""

    run_id: str
    attempt: int
    claim: str
    runpod_id: str


@dataclass(frozen=True, slots=True)
class Completion:
    """A run attempt's final outcome, image by image, to store once (Lua COMPLETE_RUN). `lane`
    prices its tokens; `runpod_ms` is RunPod's executionTime of this attempt (0: none, the batch lane)."""

    run_id: str
    attempt: int
    claim: str
    status: RunStatus
    images: dict[int, ImageRecord]
    lane: str = "realtime"
    runpod_ms: int = 0

    def keys(self) -> list[str]:
        job_id, _ = keys.split_run_id(self.run_id)
        return [keys.run(self.run_id), keys.job(job_id), keys.job_images(job_id)]

    def tokens(self) -> tuple[int, int]:
        """(prompt, output) tokens Gemini reported for the attempt's images, every call counted."""
        records = self.images.values()
        return sum(r.prompt_tokens for r in records), sum(r.output_tokens for r in records)

    def args(self, now: float, cost: RunCost) -> list[Any]:
        """COMPLETE_RUN's ARGV; `cost` is this completion's (shared.pricing.run_cost)."""
        job_id, _ = keys.split_run_id(self.run_id)
        succeeded = sum(1 for r in self.images.values() if r.status == ImageStatus.SUCCEEDED)
        args: list[Any] = [self.run_id, job_id, self.attempt, now, self.status.value, succeeded]
        args += [len(self.images) - succeeded, cost.prompt_tokens + cost.output_tokens, self.claim]
        args += [cost.lane, cost.prompt_tokens, cost.output_tokens, cost.gemini_micros]
        args += [cost.runpod_ms, cost.runpod_micros]
        # The spend periods `now` falls in, and when they end (the budget's pause lasts until then).
        args += [period_id("day", now), int(period_end("day", now))]
        args += [period_id("month", now), int(period_end("month", now))]
        for index, record in self.images.items():
            args += [index, record.model_dump_json(exclude_none=True)]
        return args


@dataclass(frozen=True, slots=True)
class Claims:
    runs: list[ClaimedRun]
    recorded: list[bool]  # per started run given: False if that attempt was no longer live


@dataclass(frozen=True, slots=True)
class QueueFigures:
    position: int | None
    wait_seconds: float | None
    run_seconds: float | None


NO_FIGURES = QueueFigures(None, None, None)
