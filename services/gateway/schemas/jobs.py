"""The bodies of the job routes (/api/jobs)."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.schemas.common import JsonRequest
from shared import models
from shared.models import ImageStatus, JobStatus


class SemiAutoJobRequest(JsonRequest, models.SemiAutoJobRequest):
    pass


class AutomaticJobRequest(JsonRequest, models.AutomaticJobRequest):
    pass


JobRequest = Annotated[SemiAutoJobRequest | AutomaticJobRequest, Field(discriminator="mode")]


class JobLinks(BaseModel):
    status: str
    results: str
    download: str
    events: str


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    links: JobLinks


class Progress(BaseModel):
    images_total: int
    images_succeeded: int
    images_failed: int
    runs_total: int
    runs_done: int


class ZipInfo(BaseModel):
    ready: bool
    bytes: int | None = None
    url: str | None = None


class JobCost(BaseModel):
    """What the job's finished run attempts cost, as recorded (zeros before any ended): Gemini's
    tokens priced by model and lane, and RunPod's execution time at the configured price."""

    lane: str
    prompt_tokens: int
    output_tokens: int
    gemini_usd: float
    runpod_seconds: float
    runpod_usd: float
    total_usd: float


class JobStatusView(BaseModel):
    id: str
    status: JobStatus
    mode: str
    # "realtime" (RunPod runs) or "batch" (Gemini batch jobs, counted as its runs).
    lane: str = "realtime"
    group: str
    group_id: str | None = None
    priority: int
    progress: Progress
    queue_position: int | None
    eta_seconds: float | None
    eta_wait_seconds: float | None = None
    eta_run_seconds: float | None = None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    zip: ZipInfo
    retry_of: str | None = None
    retried_by: str | None = None
    cost: JobCost


class JobList(BaseModel):
    jobs: list[JobStatusView]
    next_cursor: str | None


class PriorityChange(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=0, le=1000)


class RedoRequest(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    indices: list[int] = Field(min_length=1, max_length=10_000)


class Canceled(BaseModel):
    id: str
    status: JobStatus
    runs_stopped: int


class JobView(JobStatusView):
    config: dict[str, Any]


class ImageView(BaseModel):
    index: int
    status: ImageStatus
    url: str | None
    # The prompt is the page's `prompts[prompt_index]`: one job's prompts are few and long, its
    # images many, so they are sent once per page rather than once per image.
    prompt_index: int
    # Automatic mode: the input image this one is a variation of (its reference image).
    input_id: str | None
    created_at: datetime | None
    error: str | None
    detail: str | None = None


class JobResults(BaseModel):
    """One page of a job's images, in index order; `next_cursor` asks for the next page."""

    id: str
    status: JobStatus
    images_total: int
    # The prompts the page's images name, by prompt index (the base prompt is prompt 0).
    prompts: dict[int, str]
    # Semi-automatic mode: the reference images every image of the job was made from.
    reference_ids: list[str]
    images: list[ImageView]
    next_cursor: str | None
    zip: ZipInfo
    cost: JobCost


class LaneQuote(BaseModel):
    """What the job would take in one lane. Tokens as Gemini counts them (prompt text and input
    images, the model's tokens per image); RunPod time from the observed run time (none in the
    batch lane); times from the project's queue now (null: not known, as while the project or the
    whole queue is paused). In the batch lane both times are the expected turnaround of a batch."""

    runs: int
    prompt_tokens: int
    output_tokens: int
    gemini_usd: float
    runpod_worker_seconds: float
    runpod_usd: float
    total_usd: float
    expected_wait_seconds: float | None
    expected_duration_seconds: float | None


class BudgetState(BaseModel):
    """The project's budget this period (BUNCH_PROJECT_BUDGETS), USD of recorded spend."""

    period: Literal["day", "month"]
    limit_usd: float
    spent_usd: float
    remaining_usd: float
    resets_at: datetime


class JobQuote(BaseModel):
    """What a job would cost and take, in each lane; nothing is created."""

    images: int
    model: str
    lane: Literal["realtime", "batch"] = Field(description="the lane the body asked for")
    lanes: dict[Literal["realtime", "batch"], LaneQuote]
    budget: BudgetState | None
    within_budget: bool = Field(description="the quote in the body's lane fits what the budget has left")
