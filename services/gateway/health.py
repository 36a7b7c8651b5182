"""Liveness and readiness."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.gateway.deps import RedisDep, StorageDep

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "unavailable"
    redis: bool
    storage: bool


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or object storage is unreachable"}},
)
async def readyz(redis: RedisDep, storage: StorageDep) -> JSONResponse:
    try:
        redis_ok = bool(await redis.ping())
    except Exception:
        redis_ok = False
    storage_ok = await storage.ping()
    ready = redis_ok and storage_ok
    body = Readiness(status="ready" if ready else "unavailable", redis=redis_ok, storage=storage_ok)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
