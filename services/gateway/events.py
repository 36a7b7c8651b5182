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
project's unfinished jobs) whose id is the stream's last id, so resuming from it misses nothing. A
client that resumes a finished job's stream with nothing left to send gets 204 (EventSource stops
reconnecting on 204). A `: ping` comment goes out when nothing else was sent for
settings.sse_keepalive_seconds.

One process-wide reader (a dedicated Redis connection, XREAD BLOCK) fans new entries out to the
connected clients, so SSE clients never hold connections of the shared pool while waiting; catching
up after a reconnect uses short XRANGE pages on the shared pool. Streams end when the client goes
away, and on SIGTERM/SIGINT, so they never hold up the server's shutdown.
"""

import asyncio
import contextlib
import json
import logging
import re
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from services.gateway.deps import ProjectDep, RedisDep, SettingsDep, StoreDep
from services.gateway.schemas import API_PROBLEMS, problems
from shared import keys
from shared.models import FINAL_JOB_STATUSES
from shared.settings import Settings
from shared.streams import connect

log = logging.getLogger(__name__)

FINAL = frozenset(s.value for s in FINAL_JOB_STATUSES)
COUNTS = ("images_total", "images_succeeded", "images_failed", "runs_total", "runs_done")
SNAPSHOT_FIELDS = ("project", "status", *COUNTS, "mode", "group", "priority", "error")
# A stream id is two unsigned 64-bit numbers; 19 digits keep both below 2**64 (Redis refuses more).
# An empty value is no cursor at all.
STREAM_ID_PATTERN = r"^(?:(\d{1,19})(?:-(\d{1,19}))?)?$"
STREAM_ID = re.compile(STREAM_ID_PATTERN)
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_MS = 3000  # how long EventSource waits before reconnecting
PAGE = 500  # XRANGE page size while catching up
BUFFER = 10_000  # entries buffered per client before it falls back to catching up from the stream
IDLE_CHECK_S = 1.0  # how often an idle stream checks for a disconnected client
NOT_FOUND = "No such job in this project."

Fields = dict[str, str]
Match = Callable[[Fields], bool]


def _sid(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def _event(entry_id: str, kind: str, data: dict[str, Any]) -> str:
    return f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _entry_data(fields: Fields) -> dict[str, Any]:
    data: dict[str, Any] = dict(fields)
    for name in COUNTS:
        if name in data:
            with contextlib.suppress(ValueError):
                data[name] = int(data[name])
    return data


def _is_final(fields: Fields) -> bool:
    return fields.get("type") == "status" and fields.get("status") in FINAL


# --- the process-wide reader ---


class Subscription:
    def __init__(self, match: Match) -> None:
        self.match = match
        self.items: deque[tuple[str, Fields]] = deque()
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, entry_id: str, fields: Fields) -> None:
        if len(self.items) >= BUFFER:
            # A client too slow to keep up: drop the buffer, it re-reads from the stream instead.
            self.items.clear()
            self.overflowed = True
        else:
            self.items.append((entry_id, fields))
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class EventHub:
    """Reads keys.EVENTS_STREAM on its own connection and hands each new entry to the subscriptions
    it matches. Every entry after `position` reaches every subscription registered before it was read,
    and every entry up to `position` is in Redis: a client subscribes first, then reads the stream up to
    now, and misses nothing in between."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subscriptions: set[Subscription] = set()
        self.position: str | None = None
        self.closing = False
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sse-event-hub")

    async def ready(self, within_s: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), within_s)
        except TimeoutError:
            raise RedisConnectionError("the live event reader cannot reach Redis") from None

    def subscribe(self, match: Match) -> Subscription:
        subscription = Subscription(match)
        if self.closing:
            subscription.close()
        self.subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)

    def close(self) -> None:
        """End every stream (server shutdown); new ones end at once."""
        self.closing = True
        for subscription in list(self.subscriptions):
            subscription.close()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        redis = connect(self.settings)  # dedicated: it blocks in XREAD most of the time
        try:
            while True:
                try:
                    if self.position is None:
                        last = await redis.xrevrange(keys.EVENTS_STREAM, "+", "-", count=1)
                        self.position = last[0][0] if last else "0-0"
                        self._ready.set()
                    response = await redis.xread({keys.EVENTS_STREAM: self.position}, count=1000, block=5000)
                    for _stream, entries in response or []:
                        for entry_id, fields in entries:
                            self.position = entry_id
                            for subscription in list(self.subscriptions):
                                if subscription.match(fields):
                                    subscription.push(entry_id, fields)
                except (RedisError, OSError) as exc:
                    log.warning("live events: redis unavailable (%s); retrying", exc)
                    await asyncio.sleep(1.0)
        finally:
            await redis.aclose()


def _chain_shutdown_signals(callback: Callable[[], None]) -> Callable[[], None]:
    """Also call `callback` on SIGTERM/SIGINT, before the server's own handler (uvicorn waits for open
    responses to finish before it shuts down, and an event stream would never finish by itself).
    Returns the function that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed: dict[int, tuple[Any, Any]] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue  # not run by a server that handles signals itself: leave them alone

        def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def restore() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous)

    return restore


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    hub = EventHub(app.state.settings)
    app.state.event_hub = hub
    hub.start()
    restore = _chain_shutdown_signals(hub.close)
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


# --- reading the stream ---


def _cursor(header: str, query: str) -> str | None:
    """The id to resume after: the header wins (EventSource sends the newest id there on reconnect)."""
    for value in (header, query):
        if STREAM_ID.match(value) is None:
            shown = repr(value[:60])
            raise HTTPException(
                422, f"Last-Event-ID must be the id of an event this stream sent (like 1700000000000-0), not {shown}."
            )
    found = STREAM_ID.match(header or query)
    if found is None or not found.group(1):
        return None
    return f"{int(found.group(1))}-{int(found.group(2) or 0)}"


async def _last_id(redis: Redis) -> str:
    last = await redis.xrevrange(keys.EVENTS_STREAM, "+", "-", count=1)
    return str(last[0][0]) if last else "0-0"


async def _trimmed_after(redis: Redis, cursor: str) -> bool:
    """Whether entries newer than `cursor` were trimmed away (MAXLEN) before they could be resent."""
    try:
        info = await redis.xinfo_stream(keys.EVENTS_STREAM)
    except RedisError:  # no stream yet
        return False
    deleted = info.get("max-deleted-entry-id")
    return bool(deleted) and _sid(str(deleted)) > _sid(cursor)


def _job_view(job_id: str, values: list[str | None]) -> dict[str, Any] | None:
    raw = dict(zip(SNAPSHOT_FIELDS, values, strict=True))
    if raw["status"] is None:
        return None
    view: dict[str, Any] = {"job_id": job_id, **{k: (None if v == "" else v) for k, v in raw.items()}}
    for name in (*COUNTS, "priority"):
        with contextlib.suppress(TypeError, ValueError):
            view[name] = int(view[name] or 0)
    return view


async def _snapshot(redis: Redis, project: str, job_id: str | None) -> tuple[str, dict[str, Any], bool]:
    """(id, data, whether the job is already final). The state is read after the id, so it includes
    at least every change up to that id; a change after it may show up twice, never not at all."""
    snapshot_id = await _last_id(redis)
    if job_id is not None:
        view = _job_view(job_id, await redis.hmget(keys.job(job_id), SNAPSHOT_FIELDS)) or {"job_id": job_id}
        return snapshot_id, {"type": "snapshot", **view}, view.get("status") in FINAL
    job_ids = await redis.zrange(keys.project_jobs(project), 0, -1)
    jobs: list[dict[str, Any]] = []
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start : start + 1000]
        async with redis.pipeline(transaction=False) as pipe:
            for one in chunk:
                pipe.hmget(keys.job(one), SNAPSHOT_FIELDS)
            rows = await pipe.execute()
        for one, values in zip(chunk, rows, strict=True):
            row = _job_view(one, values)
            if row is not None and row["status"] not in FINAL and row.get("project") == project:
                jobs.append(row)
    return snapshot_id, {"type": "snapshot", "project": project, "jobs": jobs}, False


async def _has_entries_after(redis: Redis, cursor: str, match: Match) -> bool:
    scanned = cursor
    while True:
        page = await redis.xrange(keys.EVENTS_STREAM, min=f"({scanned}", max="+", count=PAGE)
        if any(match(fields) for _, fields in page):
            return True
        if len(page) < PAGE:
            return False
        scanned = page[-1][0]


async def _stream(
    request: Request,
    hub: EventHub,
    redis: Redis,
    settings: Settings,
    *,
    project: str,
    job_id: str | None,
    cursor: str | None,
) -> AsyncIterator[str]:
    def match(fields: Fields) -> bool:
        return fields.get("project") == project and (job_id is None or fields.get("job_id") == job_id)

    subscription = hub.subscribe(match)  # before reading anything: nothing can fall in between
    loop = asyncio.get_running_loop()
    keepalive = settings.sse_keepalive_seconds
    try:
        yield f"retry: {RETRY_MS}\n\n"
        if cursor is None or await _trimmed_after(redis, cursor):
            snapshot_id, data, finished = await _snapshot(redis, project, job_id)
            yield _event(snapshot_id, "snapshot", data)
            if finished:
                return
            cursor = snapshot_id
        scanned = cursor  # every entry up to here was sent if it matched
        catch_up = True
        last_sent = loop.time()
        while True:
            if catch_up:
                catch_up = False
                while True:
                    page = await redis.xrange(keys.EVENTS_STREAM, min=f"({scanned}", max="+", count=PAGE)
                    for entry_id, fields in page:
                        scanned = entry_id
                        if match(fields):
                            yield _event(entry_id, fields.get("type", "status"), _entry_data(fields))
                            last_sent = loop.time()
                            if job_id is not None and _is_final(fields):
                                return
                    if len(page) < PAGE:
                        break
            while subscription.items:
                entry_id, fields = subscription.items.popleft()
                if _sid(entry_id) <= _sid(scanned):
                    continue  # already sent while catching up
                scanned = entry_id
                yield _event(entry_id, fields.get("type", "status"), _entry_data(fields))
                last_sent = loop.time()
                if job_id is not None and _is_final(fields):
                    return
            if subscription.overflowed:
                subscription.overflowed = False
                catch_up = True
                continue
            if subscription.closed or await request.is_disconnected():
                return
            idle = loop.time() - last_sent
            if idle >= keepalive:
                yield ": ping\n\n"
                last_sent = loop.time()
                continue
            if subscription.items or subscription.overflowed:
                continue
            subscription.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(subscription.wakeup.wait(), min(IDLE_CHECK_S, keepalive - idle))
    finally:
        hub.unsubscribe(subscription)


def _response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream", headers=HEADERS)


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
}


@router.get(
    "/api/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        **SSE_RESPONSES,
        204: {"description": "The job is finished and every event after Last-Event-ID was sent"},
        **problems(404, described={404: NOT_FOUND}),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    project: ProjectDep,
    store: StoreDep,
    redis: RedisDep,
    settings: SettingsDep,
    last_event_id_header: LastEventIdHeader = "",
    last_event_id: LastEventIdQuery = "",
) -> Response:
    """Status and progress events of one job until it is completed, failed or canceled."""
    job = await store.get_for_project(project, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    cursor = _cursor(last_event_id_header, last_event_id)
    if cursor is not None and job.status in FINAL_JOB_STATUSES and not await _trimmed_after(redis, cursor):

        def match(fields: Fields) -> bool:
            return fields.get("job_id") == job_id

        if not await _has_entries_after(redis, cursor, match):
            return Response(status_code=status.HTTP_204_NO_CONTENT)
    hub = await _hub(request, settings)
    return _response(_stream(request, hub, redis, settings, project=project, job_id=job_id, cursor=cursor))


@router.get("/api/events", response_class=StreamingResponse, responses=SSE_RESPONSES)
async def project_events(
    request: Request,
    project: ProjectDep,
    redis: RedisDep,
    settings: SettingsDep,
    last_event_id_header: LastEventIdHeader = "",
    last_event_id: LastEventIdQuery = "",
) -> Response:
    """Status and progress events of every job of the caller's project."""
    cursor = _cursor(last_event_id_header, last_event_id)
    hub = await _hub(request, settings)
    return _response(_stream(request, hub, redis, settings, project=project, job_id=None, cursor=cursor))
