"""Server-Sent Events: live status and progress of one job, or of every job of the caller's project.

    GET /api/jobs/{id}/events     one job; ends after the job's final status (completed/failed/canceled)
    GET /api/events               every job of the caller's project; never ends by itself

Every job status or progress change is an entry of keys.EVENTS_STREAM (`emit` in
shared/lua/include/job_status.lua). Each is sent as

    id: <stream entry id>
    event: status | progress
    data: {"job_id", "type", "project", "status", "images_total", "images_succeeded", "images_failed",
           "runs_total", "runs_done"}            (the entry's fields; the counts as numbers)

A client that reconnects with `Last-Event-ID` (or `?last_event_id=` where headers cannot be set) gets
every entry after that id still in the stream, once and in order, then live ones. Without it the
first event is a `snapshot` of the current state (the job, or `{"project", "jobs": [...]}` with the
project's unfinished jobs, read from the indexes of live work plus the newest 1000 jobs, never the
whole history: services/gateway/event_stream.py) whose id is the stream's last id, so resuming from
it misses nothing. A client that resumes a finished job's stream with nothing left to send gets 204
(EventSource stops reconnecting on 204). A `: ping` comment goes out when nothing else was sent for
settings.sse_keepalive_seconds.

One process-wide reader (a dedicated Redis connection, XREAD BLOCK) fans new entries out to the
streams of their project and job (services/gateway/event_hub.py), so SSE clients never hold
connections of the shared pool while waiting; catching up after a reconnect uses short XRANGE pages
on the shared pool. Streams end when the client goes away, and on SIGTERM/SIGINT, so they never hold
up the server's shutdown. A client more than settings.sse_client_buffer events behind is cut (the
stream ends; EventSource resumes with Last-Event-ID), and a project may hold at most
settings.sse_max_streams_per_project streams per gateway process (429 with Retry-After beyond).
"""

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis

from services.gateway.deps import ProjectDep, ServicesDep
from services.gateway.event_hub import EventHub, chain_shutdown_signals
from services.gateway.event_stream import EventStreamResponse, has_entries_after, stream_events, trimmed_after
from services.gateway.job_views import JOB_NOT_FOUND, project_job
from services.gateway.schemas.common import API_PROBLEMS, problems
from shared.errors import Invalid
from shared.models import FINAL_JOB_STATUSES
from shared.settings import Settings

# A stream id is two unsigned 64-bit numbers; 19 digits keep both below 2**64 (Redis refuses more).
# An empty value is no cursor at all.
STREAM_ID_PATTERN = r"^(?:(\d{1,19})(?:-(\d{1,19}))?)?$"
STREAM_ID = re.compile(STREAM_ID_PATTERN)
TOO_MANY = "The project has as many event streams open as it may (settings.sse_max_streams_per_project)"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    hub = EventHub(app.state.settings)
    app.state.event_hub = hub
    hub.start()
    restore = chain_shutdown_signals(hub.close)
    try:
        yield
    finally:
        restore()
        await hub.stop()


router = APIRouter(tags=["events"], lifespan=lifespan, responses=API_PROBLEMS)


async def _hub(request: Request, settings: Settings) -> EventHub:
    hub: EventHub | None = getattr(request.app.state, "event_hub", None)
    if hub is None:  # an app built without this router's lifespan
        hub = request.app.state.event_hub = EventHub(settings)
        hub.start()
    await hub.ready()
    return hub


def _cursor(header: str, query: str) -> str | None:
    """The id to resume after: the header wins (EventSource sends the newest id there on reconnect)."""
    for value in (header, query):
        if STREAM_ID.match(value) is None:
            shown = repr(value[:60])
            raise Invalid(
                f"Last-Event-ID must be the id of an event this stream sent (like 1700000000000-0), not {shown}."
            )
    found = STREAM_ID.match(header or query)
    if found is None or not found.group(1):
        return None
    return f"{int(found.group(1))}-{int(found.group(2) or 0)}"


def _open(
    hub: EventHub, redis: Redis, settings: Settings, project: str, job_id: str | None, cursor: str | None
) -> Response:
    # Subscribed last, with no await until the response runs: the response is what unsubscribes.
    subscription = hub.subscribe(project, job_id)
    body = stream_events(subscription, redis, cursor=cursor, keepalive_s=settings.sse_keepalive_seconds)
    return EventStreamResponse(body, hub, subscription)


LastEventIdHeader = Annotated[
    str,
    Header(
        alias="Last-Event-ID",
        description="Resume after this event id (sent by EventSource)",
        json_schema_extra={"pattern": STREAM_ID_PATTERN},
    ),
]
LastEventIdQuery = Annotated[
    str,
    Query(
        description="Like the Last-Event-ID header, for clients that cannot set headers",
        json_schema_extra={"pattern": STREAM_ID_PATTERN},
    ),
]
SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "An event stream", "content": {"text/event-stream": {}}},
    **problems(429, described={429: TOO_MANY}),
}


@router.get(
    "/api/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        **SSE_RESPONSES,
        204: {"description": "The job is finished and every event after Last-Event-ID was sent"},
        **problems(404, described={404: JOB_NOT_FOUND}),
    },
)
async def watch_job_events(
    job_id: str,
    request: Request,
    project: ProjectDep,
    services: ServicesDep,
    last_event_id_header: LastEventIdHeader = "",
    last_event_id: LastEventIdQuery = "",
) -> Response:
    """Status and progress events of one job until it is completed, failed or canceled."""
    job = await project_job(services.store, project, job_id)
    redis, settings = services.redis, services.settings
    cursor = _cursor(last_event_id_header, last_event_id)
    if cursor is not None and job.status in FINAL_JOB_STATUSES and not await trimmed_after(redis, cursor):
        if not await has_entries_after(redis, cursor, job_id):
            return Response(status_code=status.HTTP_204_NO_CONTENT)
    hub = await _hub(request, settings)
    return _open(hub, redis, settings, project, job_id, cursor)


@router.get("/api/events", response_class=StreamingResponse, responses=SSE_RESPONSES)
async def watch_project_events(
    request: Request,
    project: ProjectDep,
    services: ServicesDep,
    last_event_id_header: LastEventIdHeader = "",
    last_event_id: LastEventIdQuery = "",
) -> Response:
    """Status and progress events of every job of the caller's project."""
    cursor = _cursor(last_event_id_header, last_event_id)
    hub = await _hub(request, services.settings)
    return _open(hub, services.redis, services.settings, project, None, cursor)
