"""The bodies of the saved batch routes (/api/batches)."""

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.schemas.common import JsonRequest
from services.gateway.schemas.jobs import AutomaticJobRequest, JobStatusView, SemiAutoJobRequest

BatchName = Annotated[str, Field(min_length=1, max_length=200)]


class SemiAutoBatchRequest(SemiAutoJobRequest):
    name: BatchName | None = None


class AutomaticBatchRequest(AutomaticJobRequest):
    name: BatchName | None = None


BatchRequest = Annotated[SemiAutoBatchRequest | AutomaticBatchRequest, Field(discriminator="mode")]


class QueueFromBatch(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    priority: int | None = Field(None, ge=0, le=1000, description="the batch's own priority when absent")


class SavedBatchSummary(BaseModel):
    id: str
    name: str | None
    mode: str
    lane: str
    rows: int = Field(description="its inputs in order: automatic, one per input image; semi-automatic, one per prompt")
    columns: list[str] = Field(description="the images each row makes: v0, v1, … (variations, or images per prompt)")
    images: int
    created_at: datetime
    latest_job_id: str | None


class SavedBatchView(SavedBatchSummary):
    config: dict[str, Any] = Field(description="the body a job queued from it is made of")
    jobs: list[JobStatusView] = Field(description="the jobs queued from it, newest first (the newest 100)")


class SavedBatchList(BaseModel):
    batches: list[SavedBatchSummary]
    next_cursor: str | None
