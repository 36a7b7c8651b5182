"""The bodies of the project queue routes (/api/queue)."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.gateway.schemas.common import JsonRequest
from services.gateway.schemas.jobs import BudgetState
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
    pause_reason: Literal["operator", "budget"] | None = Field(
        None, description="budget: its recorded spend reached its budget this period; null when not paused"
    )
    paused_until: datetime | None = Field(
        None, description="when a pause for budget ends by itself (the next period); null: until resumed"
    )


class BatchLaneState(BaseModel):
    """The project's batch lane (Gemini batch jobs): what is on Gemini now, and what waits."""

    batches_in_flight: int
    images_in_flight: int
    max_images_in_flight: int = Field(description="BUNCH_PROJECT_MAX_BATCH_IMAGES (0: no limit)")
    jobs_waiting: int = Field(description="batch-lane jobs with batches left to submit")


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
    batch: BatchLaneState | None = None
    budget: BudgetState | None = Field(None, description="the project's budget this period; null: it has none")


class HourlyPoint(BaseModel):
    hour: datetime
    images_succeeded: int
    images_failed: int
    tokens: int
    cost_usd: float = Field(description="recorded cost of the runs that ended in the hour (Gemini and RunPod)")


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
    # Recorded when runs end (shared/lua/complete_run.lua): Gemini's tokens priced by model and lane,
    # and RunPod's execution time at the configured price.
    cost_usd: float
    gemini_cost_usd: float
    runpod_cost_usd: float
    estimated_cost_usd: float = Field(
        deprecated=True, description="the same as cost_usd (once succeeded images x a price per image)"
    )
    hourly_breakdown: list[HourlyPoint]
