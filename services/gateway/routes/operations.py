"""For operators and their tools: liveness, readiness, and Prometheus metrics."""

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from services.gateway.auth import bearer_token
from services.gateway.deps import ServicesDep
from services.gateway.schemas.operations import Liveness, Readiness
from shared import metrics, redis_connection
from shared.errors import Forbidden, Unauthenticated
from shared.redis_memory import read_memory

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Liveness)
async def get_health() -> Liveness:
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or object storage is unreachable"}},
)
async def get_readiness(services: ServicesDep) -> JSONResponse:
    fraction, problem = None, None
    try:
        redis_ok = bool(await services.redis.ping())
        fraction = (await read_memory(services.redis)).fraction
    except Exception:
        redis_ok = False
        problem = await redis_connection.explain(services.redis)
    storage_ok = await services.storage.ping()
    settings = services.settings
    ready = redis_ok and storage_ok
    pressure = fraction is not None and fraction >= settings.redis_memory_refuse_fraction
    body = Readiness(
        status="ready" if ready else "unavailable",
        redis=redis_ok,
        redis_problem=problem,
        storage=storage_ok,
        redis_memory_fraction=None if fraction is None else round(fraction, 4),
        redis_memory_pressure=pressure,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, include_in_schema=False, tags=["operations"])
async def prometheus_metrics(request: Request, services: ServicesDep) -> Response:
    """Every project's figures, so only for the scraper holding BUNCH_METRICS_TOKEN (Prometheus:
    `authorization: {credentials_file: ...}` in the scrape config); without a token set, only a
    development gateway answers."""
    token = services.settings.metrics_token
    if token is None or not token.get_secret_value():
        if services.settings.env != "development":
            raise Forbidden("Metrics are off: set BUNCH_METRICS_TOKEN and scrape with it as a Bearer token.")
    else:
        sent = bearer_token(request.headers.get("Authorization", "")) or ""
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            raise Unauthenticated("Send BUNCH_METRICS_TOKEN as 'Authorization: Bearer <token>'.")
    return Response(await metrics.render(services.redis), media_type=CONTENT_TYPE_LATEST)
