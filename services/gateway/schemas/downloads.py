"""The bodies of the group download routes (/api/downloads)."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.schemas.common import JsonRequest
from shared.ids import Id
from shared.stores.downloads import DownloadStatus

MAX_GROUPS = 100


class DownloadRequest(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    group_ids: list[Id] = Field(min_length=1, max_length=MAX_GROUPS)


class DownloadAccepted(BaseModel):
    id: str
    status: DownloadStatus


class DownloadZip(BaseModel):
    ready: bool
    bytes: int | None = None
    url: str | None = None


class DownloadView(BaseModel):
    id: str
    status: DownloadStatus
    group_ids: list[str]
    # A ZIP is built only for more than one image; a single image is linked directly in `url`.
    zip: DownloadZip
    # What to fetch once ready: the ZIP, or the single image. Signed anew on every read.
    url: str | None
    image_count: int | None
    error: str | None
    created_at: datetime
    completed_at: datetime | None
