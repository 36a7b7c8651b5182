"""The bodies of the project queue routes (/api/queue)."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.gateway.schemas.common import JsonRequest
from shared.ids import ID_PATTERN, Id


class PauseState(BaseModel):
    paused: bool


class CancelMany(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    job_ids: list[Id] | None = Field(None, max_length=10_000)


class CancelCount(BaseModel):
    canceled_count: int


class RetryMany(JsonRequest):
    # The schema says what the validator checks, so clients (and schemathesis) can see it: one of the two.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["job_id"],
                    "properties": {"job_id": {"type": "string", "pattern": ID_PATTERN}, "retry_all": {"const": False}},
                },
                {"required": ["retry_all"], "properties": {"retry_all": {"const": True}, "job_id": {"type": "null"}}},
            ]
        },
    )

    job_id: Id | None = None
    retry_all: bool = False

    @model_validator(mode="after")
    def _one_of(self) -> "RetryMany":
        if bool(self.job_id) == self.retry_all:
            raise ValueError('give either "job_id" or "retry_all": true')
        return self


class Retried(BaseModel):
    id: str
    retry_of: str


class RetriedList(BaseModel):
    retried: list[Retried]


class QueueCounts(BaseModel):
    queued: int
    processing: int
    packaging: int
    completed: int
    failed: int
    canceled: int
    total_jobs: int


class DispatcherState(BaseModel):
    running: int
    active_runs: int
    max_concurrency: int
    project_max_concurrency: int
    dispatch_rpm: int
    paused: bool


class UpstreamHoldState(BaseModel):
    """No run of any project starts while this is in place: every one would fail the same way."""

    reason: str = Field(
        description="quota_exhausted, auth_failed (Gemini), runpod_auth_failed or runpod_unreachable (ends by itself)"
    )
    detail: str
    since: datetime
    until: datetime | None = Field(description="when it ends by itself (a daily quota resets); null: by an operator")


class RunPodWorkers(BaseModel):
    """RunPod's own figures for the endpoint (its /health), as a dispatcher last read them."""

    fetched_at: datetime
    workers_idle: int
    workers_running: int
    workers_throttled: int
    workers_unhealthy: int
    jobs_in_queue: int
    jobs_in_progress: int


class QueueStats(BaseModel):
    queue: QueueCounts
    dispatcher: DispatcherState
    upstream_hold: UpstreamHoldState | None = None
    runpod: RunPodWorkers | None = None


class HourlyPoint(BaseModel):
    hour: datetime
    images_succeeded: int
    images_failed: int
    tokens: int


class QueueMetrics(BaseModel):
    time_range: str
    success_rate: float | None
    avg_duration_s: float | None
    min_duration_s: float | None
    max_duration_s: float | None
    jobs_finished: int
    images_succeeded: int
    images_failed: int
    total_tokens: int
    estimated_cost_usd: float
    hourly_breakdown: list[HourlyPoint]
