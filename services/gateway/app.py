"""The gateway: Bunch's public HTTP API and RunPod's webhook receiver."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway import console
from services.gateway.auth import ApiKeyMiddleware, ApiKeys
from services.gateway.cors import add_cors
from services.gateway.deps import Services
from services.gateway.document_style import unauthenticated_body
from services.gateway.errors import add_error_handlers
from services.gateway.limits import BodyLimitMiddleware, body_limits
from services.gateway.openapi_document import TAGS, describe, operation_id
from services.gateway.request_metrics import RequestMetrics
from services.gateway.routes import (
    batches,
    datasets,
    downloads,
    events,
    exports,
    generations,
    groups,
    jobs,
    operations,
    queue,
    queue_management,
    uploads,
    webhooks,
)
from services.gateway.security_headers import SecurityHeaders
from shared.lifecycle import settle_garbage_collector
from shared.redis_connection import connect
from shared.secret_policy import refuse_unsafe_secrets
from shared.settings import Settings, get_settings
from shared.storage import Storage


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
        app.state.services = Services.build(settings, redis, storage)
        app.state.api_keys = api_keys
        settle_garbage_collector()
        yield
        await redis.aclose()

    app = FastAPI(
        title="Bunch",
        version="0.1.0",
        description="Large image-generation jobs on Gemini through RunPod Serverless.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        openapi_tags=TAGS,
        # Bunch's metrics are Prometheus (services/gateway/request_metrics.py) and it sets up no
        # OpenTelemetry provider; left on, FastAPI looks up the global providers (environment reads)
        # on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.openapi = describe(app)  # type: ignore[method-assign]
    add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limits=body_limits(settings))
    # Added after the body limit, so it runs before it: nothing of an unauthenticated body is read.
    api_keys = ApiKeys(settings.project_for_key())
    app.add_middleware(ApiKeyMiddleware, keys=api_keys, body_for=unauthenticated_body)
    # Routes are matched in order, twice per request: the job routes (status polling, submission)
    # go first, ahead of the few probes and uploads; no path of one router matches another's.
    app.include_router(jobs.router)
    app.include_router(operations.router)
    app.include_router(uploads.router)
    app.include_router(groups.router)
    app.include_router(downloads.router)
    app.include_router(exports.router)
    app.include_router(datasets.router)
    app.include_router(batches.router)
    app.include_router(queue.router)
    app.include_router(queue_management.router)
    app.include_router(generations.router)
    app.include_router(webhooks.router)
    app.include_router(webhooks.secrets_router)
    app.include_router(events.router)
    app.include_router(console.router)
    app.mount("/console/static", console.assets, name="console-static")
    app.add_middleware(SecurityHeaders)
    app.add_middleware(RequestMetrics)
    # Outermost: a preflight is answered before the API key is asked for (browsers send none), and
    # every answer, a 401 or a 429 included, carries the headers a front-end must be able to read.
    add_cors(app, settings.cors_origin_list())
    return app
