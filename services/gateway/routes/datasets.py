"""/api/datasets: the inputs of an automatic job at once, as one ZIP archive or many files
(how they are checked and stored: services/gateway/dataset_ingest.py)."""

from typing import Annotated

from fastapi import APIRouter, File, Response, UploadFile, status

from services.gateway.dataset_ingest import MAX_FILES, ingest
from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.idempotency import IdempotentRoute, idempotent
from services.gateway.schemas.common import API_PROBLEMS, problems
from services.gateway.schemas.datasets import DatasetCreated, DatasetView
from shared.times import utc

router = APIRouter(prefix="/api/datasets", tags=["datasets"], responses=API_PROBLEMS, route_class=IdempotentRoute)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetCreated,
    responses=problems(
        413,
        422,
        described={
            413: "Too many or too large files, a ZIP bomb, or images that cost more to check than a dataset may",
            422: "No usable image",
        },
    ),
    form_limits={"max_files": MAX_FILES},
)
@idempotent
async def create_dataset(
    files: Annotated[
        list[UploadFile], File(min_length=1, description="One .zip archive, or the image files themselves")
    ],
    project: ProjectDep,
    services: ServicesDep,
    response: Response,
) -> DatasetCreated:
    accepted, rejected = await ingest(services, project, files)
    dataset = await services.datasets.save(project, accepted)
    response.headers["Location"] = f"/api/datasets/{dataset.id}"
    return DatasetCreated(id=dataset.id, count=dataset.count, rejected=rejected, created_at=utc(dataset.created_at))


@router.get("/{dataset_id}", response_model=DatasetView, responses=problems(404))
async def get_dataset(dataset_id: str, project: ProjectDep, services: ServicesDep) -> DatasetView:
    dataset = await services.datasets.get(project, dataset_id)
    return DatasetView(id=dataset.id, count=dataset.count, created_at=utc(dataset.created_at))
