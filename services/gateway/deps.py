"""Request dependencies: the shared clients and the caller's project."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from redis.asyncio import Redis

from services.gateway.auth import PROJECT_SCOPE_KEY, authenticate
from services.gateway.project_slots import ProjectSlots
from shared.archive import JobArchive
from shared.errors import Unauthenticated
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.datasets import DatasetStore
from shared.stores.downloads import DownloadStore
from shared.stores.exports import ExportStore
from shared.stores.groups import GroupStore
from shared.stores.idempotency import IdempotencyStore
from shared.stores.jobs import JobStore
from shared.stores.projects import ProjectStore
from shared.stores.runs import RunStore
from shared.stores.saved_batches import SavedBatchStore
from shared.stores.uploads import UploadStore

# Heavy reads (pages of results) one project may have in progress per process: another project's
# request then waits behind at most two pages.
HEAVY_READS_PER_PROJECT = 2


@dataclass(frozen=True, slots=True)
class Services:
    """Every store and client a route may need, in one dependency: FastAPI spends CPU on every
    dependency of every request, so one beats several."""

    settings: Settings
    redis: Redis
    storage: Storage
    store: JobStore
    runs: RunStore
    groups: GroupStore
    datasets: DatasetStore
    uploads: UploadStore
    downloads: DownloadStore
    exports: ExportStore
    projects: ProjectStore
    saved_batches: SavedBatchStore
    idempotency: IdempotencyStore
    heavy_reads: ProjectSlots

    @classmethod
    def build(cls, settings: Settings, redis: Redis, storage: Storage) -> "Services":
        return cls(
            settings=settings,
            redis=redis,
            storage=storage,
            store=JobStore(redis, settings, JobArchive(storage)),
            runs=RunStore(redis, settings),
            groups=GroupStore(redis),
            datasets=DatasetStore(redis),
            uploads=UploadStore(redis),
            downloads=DownloadStore(redis),
            exports=ExportStore(redis, settings.export_max_errors_kept, settings.export_max_active_per_project),
            projects=ProjectStore(redis),
            saved_batches=SavedBatchStore(redis, settings.project_max_saved_batches),
            idempotency=IdempotencyStore(redis, settings.idempotency_ttl_seconds, settings.idempotency_lock_seconds),
            heavy_reads=ProjectSlots(HEAVY_READS_PER_PROJECT),
        )


# async: a plain `def` dependency would run in a worker thread on every request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


class ApiKey(SecurityBase):
    """The caller's project, as services/gateway/auth.py's middleware found it from the API key sent
    as 'Authorization: Bearer <key>' (before the body was read).

    One dependency that is also the OpenAPI security scheme (named HTTPBearer, as FastAPI's own
    class would be): FastAPI's HTTPBearer with a project lookup on top would be two.
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="An API key from BUNCH_API_KEYS")
        self.scheme_name = "HTTPBearer"

    async def __call__(self, request: Request) -> str:
        project: str | None = request.scope.get(PROJECT_SCOPE_KEY)
        if project is None:  # a route outside the middleware's prefix: check here
            project, problem = authenticate(request.app.state.api_keys, request.headers.get("Authorization", ""))
            if project is None:
                raise Unauthenticated(problem)
        return project


get_project = ApiKey()

ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
ProjectDep = Annotated[str, Depends(get_project)]
