"""GET /metrics for Prometheus, and the per-route request counts and times behind it."""

import hmac
import time

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.auth import UNAUTHENTICATED_HEADERS as UNAUTHENTICATED
from services.gateway.auth import bearer_token
from services.gateway.deps import ServicesDep
from shared import metrics

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response, include_in_schema=False)
async def prometheus_metrics(request: Request, services: ServicesDep) -> Response:
    """Every project's figures, so only for the scraper holding BUNCH_METRICS_TOKEN (Prometheus:
    `authorization: {credentials_file: ...}` in the scrape config); without a token set, only a
    development gateway answers."""
    token = services.settings.metrics_token
    if token is None or not token.get_secret_value():
        if services.settings.env != "development":
            raise HTTPException(403, "Metrics are off: set BUNCH_METRICS_TOKEN and scrape with it as a Bearer token.")
    else:
        sent = bearer_token(request.headers.get("Authorization", "")) or ""
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            raise HTTPException(401, "Send BUNCH_METRICS_TOKEN as 'Authorization: Bearer <token>'.", UNAUTHENTICATED)
    return Response(await metrics.render(services.redis), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """Counts requests by method, route template (not raw path: ids would explode the labels) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            metrics.HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
