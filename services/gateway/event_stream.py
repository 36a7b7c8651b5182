"""One open event stream: its snapshot, its catch-up from Redis, its live entries, and its response.

A project-wide snapshot lists the project's unfinished jobs without reading its whole history:
its queued and processing jobs (keys.project_live_jobs, the oldest SNAPSHOT_LIVE of them) and the
newest SNAPSHOT_RECENT jobs of keys.project_jobs, which cover the short packaging state. An older
job packaging while more than SNAPSHOT_RECENT newer ones were created is left out of the
snapshot; its events still come live.
"""

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from services.gateway.event_hub import (
    COUNTS,
    FINAL,
    EventHub,
    Fields,
    Subscription,
    format_entry,
    format_event,
    is_final,
    stream_key,
)
from shared import keys

SNAPSHOT_FIELDS = ("project", "status", *COUNTS, "mode", "group", "priority", "error")
SNAPSHOT_RECENT = 1000
SNAPSHOT_LIVE = 5000
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_MS = 3000  # how long EventSource waits before reconnecting
PAGE = 500  # XRANGE page size while catching up
# Events are sent in writes of about this size. A client that stops reading leaves up to the
# transport's high-water mark (64 KiB in uvloop) plus one write in the gateway's memory, and its
# generator then waits in that write while the hub's pushes fill, then cut, its subscription.
CHUNK_BYTES = 4 * 1024


def matches(subscription: Subscription, fields: Fields) -> bool:
    return fields.get("project") == subscription.project and (
        subscription.job_id is None or fields.get("job_id") == subscription.job_id
    )


async def last_id(redis: Redis) -> str:
    last = await redis.xrevrange(keys.EVENTS_STREAM, "+", "-", count=1)
    return str(last[0][0]) if last else "0-0"


async def trimmed_after(redis: Redis, cursor: str) -> bool:
    """Whether entries newer than `cursor` were trimmed away (MAXLEN) before they could be resent."""
    try:
        info = await redis.xinfo_stream(keys.EVENTS_STREAM)
    except RedisError:  # no stream yet
        return False
    deleted = info.get("max-deleted-entry-id")
    return bool(deleted) and stream_key(str(deleted)) > stream_key(cursor)


async def has_entries_after(redis: Redis, cursor: str, job_id: str) -> bool:
    scanned = cursor
    while True:
        page = await redis.xrange(keys.EVENTS_STREAM, min=f"({scanned}", max="+", count=PAGE)
        if any(fields.get("job_id") == job_id for _, fields in page):
            return True
        if len(page) < PAGE:
            return False
        scanned = page[-1][0]


def _job_view(job_id: str, values: list[str | None]) -> dict[str, Any] | None:
    raw = dict(zip(SNAPSHOT_FIELDS, values, strict=True))
    if raw["status"] is None:
        return None
    view: dict[str, Any] = {"job_id": job_id, **{k: (None if v == "" else v) for k, v in raw.items()}}
    for name in (*COUNTS, "priority"):
        with contextlib.suppress(TypeError, ValueError):
            view[name] = int(view[name] or 0)
    return view


async def _unfinished_candidates(redis: Redis, project: str) -> list[str]:
    """The project's jobs that may be unfinished (module docstring), oldest first."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.project_live_jobs(project), 0, SNAPSHOT_LIVE - 1)
        pipe.zrange(keys.project_jobs(project), -SNAPSHOT_RECENT, -1)
        live, recent = await pipe.execute()
    job_ids = list({*live, *recent})
    if not job_ids:
        return []
    created = await redis.zmscore(keys.project_jobs(project), job_ids)
    known = [(score, one) for one, score in zip(job_ids, created, strict=True) if score is not None]
    return [one for _, one in sorted(known)]


async def snapshot(redis: Redis, project: str, job_id: str | None) -> tuple[str, dict[str, Any], bool]:
    """(id, data, whether the job is already final). The state is read after the id, so it includes
    at least every change up to that id; a change after it may show up twice, never not at all."""
    snapshot_id = await last_id(redis)
    if job_id is not None:
        view = _job_view(job_id, await redis.hmget(keys.job(job_id), SNAPSHOT_FIELDS)) or {"job_id": job_id}
        return snapshot_id, {"type": "snapshot", **view}, view.get("status") in FINAL
    job_ids = await _unfinished_candidates(redis, project)
    async with redis.pipeline(transaction=False) as pipe:
        for one in job_ids:
            pipe.hmget(keys.job(one), SNAPSHOT_FIELDS)
        rows = await pipe.execute() if job_ids else []
    jobs: list[dict[str, Any]] = []
    for one, values in zip(job_ids, rows, strict=True):
        row = _job_view(one, values)
        if row is not None and row["status"] not in FINAL and row.get("project") == project:
            jobs.append(row)
    return snapshot_id, {"type": "snapshot", "project": project, "jobs": jobs}, False


async def stream_events(
    subscription: Subscription, redis: Redis, *, cursor: str | None, keepalive_s: float
) -> AsyncGenerator[str, None]:
    """The body of one stream: the retry hint, a snapshot (without a cursor), what the stream in Redis
    holds after the cursor, then the subscription's live entries until the job's final status, a cut,
    or shutdown. Ending when the client goes away is the response's part (EventStreamResponse)."""
    job_id = subscription.job_id
    yield f"retry: {RETRY_MS}\n\n"
    if cursor is None or await trimmed_after(redis, cursor):
        snapshot_id, data, finished = await snapshot(redis, subscription.project, job_id)
        yield format_event(snapshot_id, "snapshot", data)
        if finished:
            return
        cursor = snapshot_id
    # Catch up from Redis; live entries pile up in the subscription meanwhile (it came first).
    texts: list[str] = []
    size = 0
    while True:
        page = await redis.xrange(keys.EVENTS_STREAM, min=f"({cursor}", max="+", count=PAGE)
        for entry_id, fields in page:
            cursor = entry_id
            if not matches(subscription, fields):
                continue
            text = format_entry(entry_id, fields)
            texts.append(text)
            size += len(text)
            if job_id is not None and is_final(fields):
                yield "".join(texts)
                return
            if size >= CHUNK_BYTES:
                yield "".join(texts)
                texts, size = [], 0
                if subscription.cut or subscription.closed:
                    return
        if len(page) < PAGE:
            break
    if texts:
        yield "".join(texts)
    scanned = stream_key(cursor)  # every entry up to here was sent if it matched
    loop = asyncio.get_running_loop()
    last_sent = loop.time()
    items = subscription.items
    while not subscription.closed:
        if items:
            texts, size = [], 0
            while items and size < CHUNK_BYTES:
                entry = items.popleft()
                if entry.key <= scanned:
                    continue  # already sent while catching up
                scanned = entry.key
                texts.append(entry.text)
                size += len(entry.text)
                if job_id is not None and entry.final:
                    yield "".join(texts)
                    return
            if texts:
                yield "".join(texts)
                last_sent = loop.time()
            continue
        if subscription.cut:
            return
        idle = loop.time() - last_sent
        if idle >= keepalive_s:
            yield ": ping\n\n"
            last_sent = loop.time()
            continue
        # Asleep until an entry, the keep-alive or shutdown: an idle stream costs nothing meanwhile.
        subscription.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(keepalive_s - idle):
                await subscription.wakeup.wait()


class EventStreamResponse(StreamingResponse):
    """Streams `body` until it ends or the client goes away, then frees its subscription.

    The client going away is heard from the ASGI `receive()` (`http.disconnect`), always: Starlette
    listens for it only for servers of ASGI spec < 2.4 and otherwise relies on a send failing, which
    an idle stream would not attempt before its next keep-alive (and uvicorn's send to a closed
    connection just returns). The subscription is freed however the response ends, since it holds
    one of the project's places (EventHub.subscribe)."""

    def __init__(self, body: AsyncGenerator[str, None], hub: EventHub, subscription: Subscription) -> None:
        super().__init__(body, media_type="text/event-stream", headers=HEADERS)
        self._body = body
        self._hub = hub
        self._subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def respond() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(respond)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        except BaseExceptionGroup as errors:
            # A failure is raised as itself (anyio groups even one), as Starlette's responses do.
            if len(errors.exceptions) != 1:
                raise
            error = errors.exceptions[0]
            raise error from error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        finally:
            self._hub.unsubscribe(self._subscription)
            with contextlib.suppress(Exception):
                await self._body.aclose()
