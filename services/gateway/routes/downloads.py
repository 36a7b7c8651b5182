"""/api/downloads: downloads of whole groups. Ask for one, then follow it to its link."""

from fastapi import APIRouter, Response, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.downloads import DownloadAccepted, DownloadRequest, DownloadView, DownloadZip
from shared.errors import NotFound
from shared.storage import Storage
from shared.stores.downloads import DownloadRecord, DownloadStatus
from shared.times import utc

router = APIRouter(prefix="/api/downloads", tags=["downloads"], responses=API_PROBLEMS, route_class=IdempotentRoute)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DownloadAccepted,
    responses=problems(404, described={404: "A group is not in this project"}),
)
@idempotent
async def request_download(
    body: DownloadRequest, project: ProjectDep, services: ServicesDep, response: Response
) -> DownloadAccepted:
    group_ids = list(dict.fromkeys(body.group_ids))
    for group_id in group_ids:
        if await services.groups.find(project, group_id) is None:
            raise NotFound(f"No such group in this project: {group_id}.")
    record = await services.downloads.create(project, group_ids)
    response.headers["Location"] = f"/api/downloads/{record.id}"
    return DownloadAccepted(id=record.id, status=record.status)


@router.get("/{download_id}", response_model=DownloadView, responses=problems(404))
async def get_download(download_id: str, project: ProjectDep, services: ServicesDep) -> DownloadView:
    return _view(await services.downloads.get(project, download_id), services.storage)


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
        created_at=utc(record.created_at),
        completed_at=utc(record.completed_at),
    )
