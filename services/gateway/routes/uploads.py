"""/api/uploads: reference and input images, checked, then stored by content hash."""

from typing import Annotated

from fastapi import APIRouter, File, UploadFile, status

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.images import CheckedImage, ImageRejected
from services.gateway.intake import check_upload, read_limited, store_upload
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.uploads import UploadsCreated
from shared.errors import TooLarge

router = APIRouter(prefix="/api", tags=["uploads"], responses=API_PROBLEMS, route_class=IdempotentRoute)

MAX_FILES = 100  # per request; /api/datasets takes more


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadsCreated,
    responses=problems(
        413, 415, described={413: "A file over the size limit, an image with too many pixels, or too many files"}
    ),
)
@idempotent
async def create_uploads(
    files: Annotated[list[UploadFile], File(min_length=1, description="PNG, JPEG, WEBP or HEIC/HEIF images")],
    project: ProjectDep,
    services: ServicesDep,
) -> UploadsCreated:
    if len(files) > MAX_FILES:
        raise TooLarge(f"At most {MAX_FILES} files per upload request; use /api/datasets for more.")
    checked: list[tuple[CheckedImage, bytes]] = []
    # Check every file before storing any, so a bad file leaves nothing behind.
    for file in files:
        data = await read_limited(file, services.settings.max_upload_bytes)
        try:
            checked.append((await check_upload(services, project, data), data))
        except ImageRejected as exc:
            raise type(exc)(f"{file.filename or 'file'}: {exc.reason}") from None
    return UploadsCreated(
        uploads=[
            await store_upload(services.storage, services.uploads, project, image, data) for image, data in checked
        ]
    )
