"""Liveness and readiness."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.gateway.deps import RedisDep, SettingsDep, StorageDep
from shared.redis_memory import read_memory

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "unavailable"
    redis: bool
    storage: bool
    # Redis's used memory over its maxmemory (None: no limit set, or unreachable), and whether it is
    # past the point where new jobs are refused: still ready, for every other request.
    redis_memory_fraction: float | None = None
    redis_memory_pressure: bool = False


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or object storage is unreachable"}},
)
async def readyz(redis: RedisDep, storage: StorageDep, settings: SettingsDep) -> JSONResponse:
    fraction = None
    try:
        redis_ok = bool(await redis.ping())
        fraction = (await read_memory(redis)).fraction
    except Exception:
        redis_ok = False
    storage_ok = await storage.ping()
    ready = redis_ok and storage_ok
    pressure = fraction is not None and fraction >= settings.redis_memory_refuse_fraction
    body = Readiness(
        status="ready" if ready else "unavailable",
        redis=redis_ok,
        storage=storage_ok,
        redis_memory_fraction=None if fraction is None else round(fraction, 4),
        redis_memory_pressure=pressure,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
