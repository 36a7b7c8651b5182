"""The bodies of the job routes (/api/jobs)."""

from datetime import datetime
from typing import Annotated, Any

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


class JobStatusView(BaseModel):
    id: str
    status: JobStatus
    mode: str
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
