"""Pydantic models and the status vocabulary shared by every service."""

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from shared.ids import Id


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    PACKAGING = "packaging"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_JOB_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})
# The same as Redis hashes and API bodies spell them, for code that holds the raw string.
FINAL_STATUS_VALUES: frozenset[str] = frozenset(status.value for status in FINAL_JOB_STATUSES)
# Runs of the job may still start (its images count against the project's quota).
LIVE_JOB_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING})
# A retry is a new job with the same config: of a job that ended without doing all it was asked.
RETRYABLE_JOB_STATUSES = frozenset({JobStatus.FAILED, JobStatus.CANCELED})


class RunStatus(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


# The state machines, the one place their transitions are written down. The Lua scripts get them
# as tables (shared/scripts.py) and every status change there is checked against them.
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.CANCELED}),  # its first run starts
    JobStatus.PROCESSING: frozenset({JobStatus.PACKAGING, JobStatus.CANCELED}),  # its last run ends
    JobStatus.PACKAGING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),  # nothing succeeded: failed
    JobStatus.COMPLETED: frozenset({JobStatus.PROCESSING}),  # a redo reopens it
    JobStatus.FAILED: frozenset({JobStatus.PROCESSING}),
    JobStatus.CANCELED: frozenset(),
}
RUN_TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    # A planned run has no record until it is first claimed (dispatched); a redo run starts queued.
    RunStatus.QUEUED: frozenset({RunStatus.DISPATCHED, RunStatus.CANCELED}),
    # Requeued: a failed attempt to try again, or a /run call that never reached RunPod.
    RunStatus.DISPATCHED: frozenset({RunStatus.QUEUED, RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELED: frozenset(),
}


class ImageStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]
# Something besides whitespace, as the JSON schema says too (Python's strip also takes \x1c-\x1f).
GroupName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"[^\s\x1c-\x1f]")
]
UploadId = Id


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    aspect_ratio: Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"] | None = None
    image_size: Literal["1K", "2K", "4K"] | None = None


WebhookUrl = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000, pattern=r"^https?://")]
# How a job's images are made: "realtime" through RunPod runs (minutes), "batch" through Gemini's
# Batch API (half the price, no RunPod time, results within 24 hours).
Lane = Literal["realtime", "batch"]
LANES: tuple[Lane, ...] = ("realtime", "batch")


class SemiAutoJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["semi_auto"]
    group: GroupName = "default"
    prompts: list[Prompt] = Field(min_length=1)
    reference_ids: list[UploadId] = Field(default_factory=list)
    images_per_prompt: int = Field(ge=1, le=10_000)
    priority: int = Field(10, ge=0, le=1000)
    params: GenerationParams = Field(default_factory=GenerationParams)
    webhook_url: WebhookUrl | None = None
    lane: Lane = "realtime"


class AutomaticJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["automatic"]
    group: GroupName = "default"
    base_prompt: Prompt
    # Either the inputs themselves or a dataset; the gateway turns a dataset into its input ids.
    input_ids: list[UploadId] = Field(default_factory=list)
    dataset_id: Id | None = None
    variations_per_image: int = Field(1, ge=1, le=16)
    priority: int = Field(10, ge=0, le=1000)
    params: GenerationParams = Field(default_factory=GenerationParams)
    webhook_url: WebhookUrl | None = None
    lane: Lane = "realtime"

    @model_validator(mode="after")
    def _inputs_or_dataset(self) -> "AutomaticJobRequest":
        if not self.input_ids and not self.dataset_id:
            raise ValueError("give input_ids (uploaded images) or dataset_id (an uploaded dataset)")
        return self


JobRequest = Annotated[SemiAutoJobRequest | AutomaticJobRequest, Field(discriminator="mode")]


# --- the RunPod payload: what the dispatcher sends and the worker reads (worker/handler.py) ---


class WorkItem(BaseModel):
    index: int
    prompt: str
    reference_urls: list[str]
    output_url: str


class RunLimits(BaseModel):
    """How long the worker may spend on a run, from Bunch's settings, so that every retry it makes
    ends inside RunPod's executionTimeout (shared/settings.py checks the sum at start-up)."""

    gemini_timeout_seconds: float = Field(gt=0)
    gemini_max_attempts: int = Field(ge=1)
    gemini_backoff_max_seconds: float = Field(ge=0)
    # Everything the run does (downloads, Gemini calls and their retries, uploads) ends this long
    # after the worker starts it, successful or not: the rest of executionTimeout is a margin.
    budget_seconds: float = Field(gt=0)


class RunInput(BaseModel):
    task: Literal["semi_auto_generation", "automatic_generation"]
    job_id: str
    run_id: str
    attempt: int
    model: str
    params: GenerationParams
    items: list[WorkItem]
    limits: RunLimits | None = None


# Why an image failed, as the worker reports it (ImageOutcome.error). The dispatcher reacts to the
# class: QUOTA_EXHAUSTED and AUTH_FAILED pause the queue (every run would fail the same way).
class FailureReason(StrEnum):
    SAFETY_BLOCKED = "safety_blocked"  # final: the model refused on policy grounds
    NO_IMAGE = "no_image"  # the model answered without an image (after one retry of NO_IMAGE/IMAGE_OTHER)
    UPSTREAM_ERROR = "upstream_error"  # 5xx, timeouts, connection errors, after the retries
    RATE_LIMITED = "rate_limited"  # per-minute quota (429) still exceeded after the retries
    QUOTA_EXHAUSTED = "quota_exhausted"  # a daily quota: nothing succeeds before it resets
    AUTH_FAILED = "auth_failed"  # missing or invalid key, no permission, billing not enabled
    BAD_REQUEST = "bad_request"  # unknown model, unsupported parameter: the request itself is wrong


class ImageOutcome(BaseModel):
    """One image of a worker's result (RunPod `output.images[]`).

    Bounded because anyone holding a run's webhook token can write it: a negative token count
    would subtract from the project's figures, and an unbounded string is stored with the image.
    Strict numbers: a worker sends JSON integers, so `true`, `1.5` or `"7"` are not a count. The
    limits an operator sets (largest image, most tokens) are checked by the dispatcher.
    """

    index: int = Field(strict=True, ge=0)
    status: Literal["succeeded", "failed"]
    error: str | None = Field(None, pattern=r"^[a-z0-9_]{1,64}$")
    detail: str | None = Field(None, max_length=1000)
    mime_type: str | None = Field(None, max_length=100)
    bytes: int | None = Field(None, strict=True, ge=1)
    crc32: int | None = Field(None, strict=True, ge=0, le=0xFFFFFFFF)
    prompt_tokens: int = Field(0, strict=True, ge=0)
    output_tokens: int = Field(0, strict=True, ge=0)
