"""The gateway: Bunch's public HTTP API and RunPod's webhook receiver."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import urllib3
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minio.error import MinioException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway import (
    console,
    datasets,
    downloads,
    events,
    groups,
    health,
    jobs,
    metrics,
    queue,
    uploads,
    webhooks,
)
from services.gateway.auth import ApiKeyMiddleware, ApiKeys
from services.gateway.deps import Services
from services.gateway.http_errors import method_not_allowed
from services.gateway.limits import BodyLimitMiddleware, body_limits
from services.gateway.project_slots import ProjectSlots
from services.gateway.security_headers import SecurityHeaders
from shared.archive import JobArchive
from shared.errors import BunchError, OverQuota
from shared.jobstore import JobStore
from shared.lifecycle import settle_garbage_collector
from shared.secret_policy import refuse_unsafe_secrets
from shared.settings import Settings, get_settings
from shared.storage import Storage
from shared.streams import connect

# Heavy reads (pages of results) one project may have in progress per process: another project's
# request then waits behind at most two pages.
HEAVY_READS_PER_PROJECT = 2


def _readable(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
        messages.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(messages) or "Invalid request."


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
    return JSONResponse({"detail": _readable(exc), "errors": errors}, status_code=422)


async def _refused(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BunchError)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, OverQuota) else None
    return JSONResponse({"detail": exc.message}, exc.status_code, headers=headers)


async def _dependency_down(_: Request, exc: Exception) -> JSONResponse:
    what = "Object storage" if isinstance(exc, MinioException | urllib3.exceptions.HTTPError) else "Redis"
    return JSONResponse({"detail": f"{what} is unavailable; nothing was changed. Try again shortly."}, 503)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        refuse_unsafe_secrets(settings)
        redis = connect(settings)
        storage = Storage(settings)
        await storage.ensure_bucket()
        app.state.settings = settings
        app.state.redis = redis
        app.state.storage = storage
        app.state.store = JobStore(redis, settings, JobArchive(storage))
        app.state.services = Services(settings, redis, app.state.store, storage)
        app.state.api_keys = api_keys
        app.state.heavy_reads = ProjectSlots(HEAVY_READS_PER_PROJECT)
        settle_garbage_collector()
        yield
        await redis.aclose()

    app = FastAPI(
        title="Bunch",
        version="0.1.0",
        description="Large image-generation jobs on Gemini through RunPod Serverless.",
        lifespan=lifespan,
        # Bunch's metrics are Prometheus (services/gateway/metrics.py) and it sets up no OpenTelemetry
        # provider; left on, FastAPI looks up the global providers (environment reads) on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(405, method_not_allowed)
    app.add_exception_handler(BunchError, _refused)
    app.add_middleware(BodyLimitMiddleware, limits=body_limits(settings))
    # Added after the body limit, so it runs before it: nothing of an unauthenticated body is read.
    api_keys = ApiKeys(settings.project_for_key())
    app.add_middleware(ApiKeyMiddleware, keys=api_keys)
    for error in (MinioException, urllib3.exceptions.HTTPError, RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(error, _dependency_down)
    # Routes are matched in order, twice per request: the job routes (status polling, submission)
    # go first, ahead of the few probes and uploads; no path of one router matches another's.
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(uploads.router)
    app.include_router(groups.router)
    app.include_router(downloads.router)
    app.include_router(datasets.router)
    app.include_router(queue.router)
    app.include_router(webhooks.router)
    app.include_router(webhooks.secrets_router)
    app.include_router(events.router)
    app.include_router(console.router)
    app.mount("/console/static", console.assets, name="console-static")
    app.add_middleware(SecurityHeaders)
    app.add_middleware(metrics.RequestMetrics)
    return app
