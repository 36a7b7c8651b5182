"""Downloads of whole groups: ask for one (`POST /api/downloads`), then follow it to its link."""

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.deps import ProjectDep, RedisDep, StorageDep
from services.gateway.groups import load_group
from services.gateway.schemas import API_PROBLEMS, JsonRequest, problems
from shared.downloads import DownloadRecord, DownloadStatus, create_download, load_download
from shared.ids import Id
from shared.storage import Storage

router = APIRouter(prefix="/api/downloads", tags=["downloads"], responses=API_PROBLEMS)

NOT_FOUND = "No such download in this project."
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


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _view(record: DownloadRecord, storage: Storage) -> DownloadView:
    zip_info, url = DownloadZip(ready=False), None
    if record.status == DownloadStatus.READY and record.zip_key:
        url = storage.presigned_get(record.zip_key, f"bunch-download-{record.id}.zip")
        zip_info = DownloadZip(ready=True, bytes=record.zip_bytes, url=url)
    elif record.status == DownloadStatus.READY and record.single_key:
        url = storage.presigned_get(record.single_key, record.single_name)
    return DownloadView(
        id=record.id,
        status=record.status,
        group_ids=record.group_ids,
        zip=zip_info,
        url=url,
        image_count=record.image_count,
        error=record.error,
        created_at=datetime.fromtimestamp(record.created_at, UTC),
        completed_at=_time(record.completed_at),
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DownloadAccepted,
    responses=problems(404, described={404: "A group is not in this project"}),
)
async def request_download(body: DownloadRequest, project: ProjectDep, redis: RedisDep) -> DownloadAccepted:
    group_ids = list(dict.fromkeys(body.group_ids))
    for group_id in group_ids:
        if await load_group(redis, project, group_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"No such group in this project: {group_id}.")
    record = await create_download(redis, project, group_ids)
    return DownloadAccepted(id=record.id, status=record.status)


@router.get("/{download_id}", response_model=DownloadView, responses=problems(404))
async def download_status(download_id: str, project: ProjectDep, redis: RedisDep, storage: StorageDep) -> DownloadView:
    record = await load_download(redis, download_id)
    if record is None or record.project != project:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return _view(record, storage)
