"""The bodies of /api/generations (services/gateway/routes/generations.py), in the document style
of the generations plan: camelCase names, and `{"success": false, "error": ...}` for errors."""

from datetime import datetime
from typing import Literal

from services.gateway.document_style import DocumentModel

# The plan's job statuses (its generation_jobs.status column).
PlanStatus = Literal["queued", "running", "success", "failed", "canceled"]


class GenerationProgress(DocumentModel):
    """`current`: images finished (succeeded or failed) of `total`; `completedImages`: the indices of
    the images on this page of the answer that succeeded."""

    current: int
    total: int
    completed_images: list[int]


class GenerationMetadata(DocumentModel):
    """What the job was asked for, and its ZIP's link once the ZIP is ready."""

    mode: str
    lane: str
    group: str
    group_id: str | None
    batch_id: str | None
    number_of_variations: int
    zip_url: str | None = None


class GenerationJob(DocumentModel):
    id: str
    type: Literal["image_generation"]
    status: PlanStatus
    progress: GenerationProgress
    error: str | None
    metadata: GenerationMetadata
    started_at: datetime | None
    completed_at: datetime | None
    created_at: datetime
    updated_at: datetime


class Generation(DocumentModel):
    """The generation a completed job made: its succeeded images, packaged as one ZIP."""

    id: str
    status: PlanStatus
    image_count: int
    zip_url: str | None
    created_at: datetime
    completed_at: datetime | None


class GenerationImage(DocumentModel):
    """A finished image: a succeeded one has its `url` (a presigned link), a failed one its `error`."""

    id: str
    index: int
    url: str | None
    prompt: str
    status: Literal["success", "failed"]
    error: str | None
    created_at: datetime


class GenerationView(DocumentModel):
    """One poll of a job: the job, its generation (null until it completed), and the finished images
    among the slots of this page, in index order. `nextCursor`: the `cursor` of the next page, null
    after the last."""

    job: GenerationJob
    generation: Generation | None
    images: list[GenerationImage]
    next_cursor: int | None


class RetryJob(DocumentModel):
    id: str
    status: PlanStatus
    created_at: datetime


class RetryAccepted(DocumentModel):
    """A new job, queued with the original job's parameters (the original is left as it was)."""

    job: RetryJob
    message: str
    original_job_id: str
