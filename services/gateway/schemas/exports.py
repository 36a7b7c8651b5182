"""The bodies of the export routes (/api/exports)."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.gateway.schemas.common import JsonRequest
from shared.export_destinations import DestinationName
from shared.ids import Id
from shared.models import WebhookUrl
from shared.stores.exports import ExportLayout, ExportStatus

MAX_IDS = 100


class ExportDestinationView(BaseModel):
    """A destination the operator set for the project; its credentials are never shown."""

    name: str
    endpoint: str
    bucket: str
    prefix: str


class ExportDestinations(BaseModel):
    destinations: list[ExportDestinationView]


class ExportRequest(JsonRequest):
    model_config = ConfigDict(extra="forbid", strict=True)

    destination: DestinationName
    # Exactly one of the two: whole groups, or some jobs (each in its own group's folder).
    group_ids: list[Id] | None = Field(None, min_length=1, max_length=MAX_IDS)
    job_ids: list[Id] | None = Field(None, min_length=1, max_length=MAX_IDS)
    # by_group: <prefix>/<group>/<job_id>/<index>.<ext>; flat: <prefix>/<job_id>-<index>.<ext>.
    layout: Literal["by_group", "flat"] = "by_group"
    include_manifest: bool = True
    # POSTed (signed, as a job's) when the export ends: event "export.finished".
    webhook_url: WebhookUrl | None = None

    @model_validator(mode="after")
    def _groups_or_jobs(self) -> "ExportRequest":
        if (self.group_ids is None) == (self.job_ids is None):
            raise ValueError("give exactly one of group_ids and job_ids")
        return self


class ExportAccepted(BaseModel):
    id: str
    status: ExportStatus


class ExportProgress(BaseModel):
    # Null until a packager has counted the export's objects: its images and a manifest per job.
    objects_total: int | None
    objects_done: int
    objects_copied: int
    # Already at the destination with the same size and CRC-32 (a repeated or resumed export).
    objects_skipped: int
    objects_failed: int
    bytes_copied: int


class ExportObjectError(BaseModel):
    object: str  # the key at the destination
    job_id: str
    index: int | None  # null: the job's manifest
    reason: str


class ExportView(BaseModel):
    id: str
    status: ExportStatus
    destination: str
    layout: ExportLayout
    include_manifest: bool
    group_ids: list[str]
    job_ids: list[str]
    progress: ExportProgress
    # The first failures (settings.export_max_errors_kept); `errors_truncated` when there were more.
    errors: list[ExportObjectError]
    errors_truncated: bool
    error: str | None
    webhook_status: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class ExportList(BaseModel):
    exports: list[ExportView]
