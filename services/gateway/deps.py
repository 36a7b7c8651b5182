"""Request dependencies: the shared clients and the caller's project."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase
from redis.asyncio import Redis

from services.gateway.auth import PROJECT_SCOPE_KEY, UNAUTHENTICATED_HEADERS, authenticate
from shared.jobstore import JobStore
from shared.settings import Settings
from shared.storage import Storage


@dataclass(frozen=True, slots=True)
class Services:
    """The shared clients in one dependency, for the busiest routes: FastAPI spends some 10 us of
    CPU per dependency per request, so one beats three."""

    settings: Settings
    redis: Redis
    store: JobStore
    storage: Storage


# async: a plain `def` dependency would run in a worker thread on every request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
    return request.app.state.redis


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


class ApiKey(SecurityBase):
    """The caller's project, as services/gateway/auth.py's middleware found it from the API key sent
    as 'Authorization: Bearer <key>' (before the body was read).

    One dependency that is also the OpenAPI security scheme (named HTTPBearer, as FastAPI's own
    class would be): FastAPI's HTTPBearer with a project lookup on top would be two, and FastAPI
    spends some 15 us of CPU per dependency per request.
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="An API key from BUNCH_API_KEYS")
        self.scheme_name = "HTTPBearer"

    async def __call__(self, request: Request) -> str:
        project: str | None = request.scope.get(PROJECT_SCOPE_KEY)
        if project is None:  # a route outside the middleware's prefix: check here
            project, problem = authenticate(request.app.state.api_keys, request.headers.get("Authorization", ""))
            if project is None:
                raise HTTPException(status.HTTP_401_UNAUTHORIZED, problem, headers=UNAUTHENTICATED_HEADERS)
        return project


get_project = ApiKey()

ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
ProjectDep = Annotated[str, Depends(get_project)]
