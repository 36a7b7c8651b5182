"""The bodies of the queue management API in the document style (docs/compatible_api.md):
camelCase on the wire, `success` in every answer, the document's fields and defaults."""

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from services.gateway.document_style import DocumentModel
from shared.ids import ID_PATTERN, Id

ProjectId = Field(min_length=1, max_length=200, description="the caller's own project (its API key's); any other: 404")


class DocumentRequest(DocumentModel):
    """Strict as every request body of the API (services/gateway/schemas/common.JsonRequest), and in
    camelCase only: a snake_case name is an unknown field."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, strict=True, extra="forbid")


class DocumentAnswer(DocumentModel):
    success: Literal[True] = True


class EnqueueRequest(DocumentRequest):
    batch_id: Id | None = None
    batch_ids: list[Id] | None = Field(None, min_length=1, max_length=100)
    project_id: str = ProjectId
    priority: int = Field(10, ge=0, le=1000, description="lower runs first")

    @model_validator(mode="after")
    def _some_batch(self) -> "EnqueueRequest":
        if not self.batch_id and not self.batch_ids:
            raise ValueError('give "batchId" or "batchIds"')
        return self

    def all_batch_ids(self) -> list[str]:
        return list(dict.fromkeys([*([self.batch_id] if self.batch_id else []), *(self.batch_ids or [])]))


class Enqueued(DocumentAnswer):
    job_id: str
    job_ids: list[str]
    canceled_count: int = Field(description="the batches' queued or running jobs canceled first")
    message: str


class QueueJob(DocumentModel):
    id: str
    type: Literal["process_batch"] = "process_batch"
    status: Literal["queued", "processing", "completed", "failed", "canceled"]
    priority: int
    data: dict[str, Any]
    attempts: int = Field(description="times this work was started: this job once started, plus each job it retries")
    max_attempts: int = Field(description="attempts each of its runs gets (BUNCH_MAX_RUN_ATTEMPTS)")
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    error: str | None


class QueueJobAnswer(DocumentAnswer):
    job: QueueJob


class RetryDocument(DocumentRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["jobId"],
                    "properties": {"jobId": {"type": "string", "pattern": ID_PATTERN}, "retryAll": {"const": False}},
                },
                {"required": ["retryAll"], "properties": {"retryAll": {"const": True}, "jobId": {"type": "null"}}},
            ]
        }
    )

    job_id: Id | None = None
    project_id: str = ProjectId
    retry_all: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "RetryDocument":
        if bool(self.job_id) == self.retry_all:
            raise ValueError('give either "jobId" or "retryAll": true')
        return self


class RetriedDocument(DocumentAnswer):
    message: str
    job_ids: list[str] = Field(description="the new jobs, one per job retried (a retry is a job of its own)")


class RedoDocument(DocumentRequest):
    batch_id: Id
    project_id: str = ProjectId
    row_index: int = Field(ge=0)
    redo_column_ids: list[str] = Field(min_length=1, max_length=10_000)
    cropped_image_ids: dict[str, Id] = Field(description="column id -> an upload replacing the row's source image")
    source_image_ids: dict[str, Id] | None = None
    priority: int = Field(5, ge=0, le=1000)


class Redone(DocumentAnswer):
    job_id: str
    job_ids: list[str] = Field(description="every job the redo runs in (more than one with replaced images)")
    message: str


class CancelDocument(DocumentRequest):
    project_id: str = ProjectId
    batch_ids: list[Id] | None = Field(None, max_length=1000)


class CanceledDocument(DocumentAnswer):
    canceled_count: int
    batches_reset: int = Field(description="batches of which a job was canceled")
    message: str


class DocumentQueueCounts(DocumentModel):
    queued: int
    processing: int
    completed: int
    failed: int
    total_jobs: int


class DocumentWorker(DocumentModel):
    is_running: bool = Field(description="runs of the project start: it is not paused and no upstream hold is on")
    active_jobs: int
    requests_per_minute: int = Field(description="BUNCH_DISPATCH_RPM, runs started per minute (0: no limit)")
    max_concurrency: int


class DocumentStats(DocumentAnswer):
    queue: DocumentQueueCounts
    worker: DocumentWorker


class DocumentHour(DocumentModel):
    hour: datetime
    completed: int
    failed: int
    tokens: int
    cost_usd: float


class DocumentMetricFigures(DocumentModel):
    success_rate: float | None
    avg_duration: float | None = Field(description="milliseconds")
    min_duration: float | None = Field(description="milliseconds")
    max_duration: float | None = Field(description="milliseconds")
    total_tokens: int
    hourly_breakdown: list[DocumentHour]


class DocumentMetrics(DocumentAnswer):
    stats: DocumentMetricFigures
