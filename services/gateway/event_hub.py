"""The gateway's one reader of keys.EVENTS_STREAM, and the subscriptions of the open event streams.

What an event stream costs is bounded, whatever its client does:

- Between events it costs nothing: its generator sleeps on the subscription until an entry arrives,
  its keep-alive falls due or the server shuts down (services/gateway/event_stream.py), and a client
  going away is noticed by the ASGI `receive()` returning `http.disconnect`, not by polling.
- An entry is handed only to the subscriptions of its project (and of its job): subscriptions are
  indexed by project and job id, so an entry costs nothing per stream of another project. It is
  formatted once, and every stream it goes to shares that text.
- A subscription holds at most settings.sse_client_buffer entries. A client that falls further
  behind (its socket stops taking data, so its generator waits on a send while entries pile up) is
  cut: its buffer is dropped, it gets nothing more, and its stream ends as soon as its pending send
  completes; EventSource reconnects with Last-Event-ID and catches up from the stream in Redis.
  Pushing never waits, so a slow client slows neither the reader nor anyone else.
- A project has at most settings.sse_max_streams_per_project streams open at once, counted from
  the subscription until its response has ended (client gone, cut, finished, or shutdown). The
  count is per gateway process: each replica allows that many, with no Redis round trip per stream.
"""

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared import keys
from shared.errors import OverQuota
from shared.models import FINAL_JOB_STATUSES
from shared.redis_connection import connect
from shared.settings import Settings

log = logging.getLogger(__name__)

FINAL = frozenset(s.value for s in FINAL_JOB_STATUSES)
COUNTS = (
    *("images_total", "images_succeeded", "images_failed", "runs_total", "runs_done"),
    # An export's (type "export"); objects_total is "" until it is counted.
    *("objects_total", "objects_done", "objects_copied", "objects_skipped", "objects_failed", "bytes_copied"),
)
READ_COUNT = 1000  # entries per XREAD
STREAMS_RETRY_AFTER_S = 10  # what a refused stream is told: long-lived streams free a place rarely

Fields = dict[str, str]


def stream_key(value: str) -> tuple[int, int]:
    """A stream id as a sortable pair."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def format_event(entry_id: str, kind: str, data: dict[str, Any]) -> str:
    return f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def entry_data(fields: Fields) -> dict[str, Any]:
    data: dict[str, Any] = dict(fields)
    for name in COUNTS:
        if name in data:
            with contextlib.suppress(ValueError):
                data[name] = int(data[name])
    return data


def is_final(fields: Fields) -> bool:
    return fields.get("type") == "status" and fields.get("status") in FINAL


def format_entry(entry_id: str, fields: Fields) -> str:
    return format_event(entry_id, fields.get("type", "status"), entry_data(fields))


class Entry:
    """One entry of the stream, ready to send; the same object goes to every stream it matches."""

    __slots__ = ("final", "id", "key", "text")

    def __init__(self, entry_id: str, fields: Fields) -> None:
        self.id = entry_id
        self.key = stream_key(entry_id)
        self.text = format_entry(entry_id, fields)
        self.final = is_final(fields)


class Subscription:
    """The entries waiting for one open stream: those of `project`, or of its job `job_id`."""

    __slots__ = ("capacity", "closed", "counted", "cut", "indexed", "items", "job_id", "project", "wakeup")

    def __init__(self, project: str, job_id: str | None, capacity: int) -> None:
        self.project = project
        self.job_id = job_id
        self.capacity = capacity
        self.items: deque[Entry] = deque()
        self.wakeup = asyncio.Event()
        self.cut = False  # fell more than `capacity` entries behind: the stream ends, the client resumes
        self.closed = False  # the server is shutting down
        self.indexed = False
        self.counted = False

    def push(self, entry: Entry) -> bool:
        """Queue `entry`; False when that would exceed the buffer, and the subscription is cut instead."""
        if len(self.items) >= self.capacity:
            self.cut = True
            self.items.clear()  # the client catches up from Redis: hold nothing for it here
            self.wakeup.set()
            return False
        self.items.append(entry)
        self.wakeup.set()
        return True

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()


class ProjectStreams:
    """A project's open streams: those of every job, those of one job, and how many are open."""

    __slots__ = ("by_job", "every_job", "open")

    def __init__(self) -> None:
        self.every_job: set[Subscription] = set()
        self.by_job: dict[str, set[Subscription]] = {}
        self.open = 0  # subscriptions whose response has not ended, cut ones included


class EventHub:
    """Reads keys.EVENTS_STREAM on its own connection and hands each new entry to the subscriptions
    of its project and job. Every entry after `position` reaches every subscription registered before
    it was read, and every entry up to `position` is in Redis: a client subscribes first, then reads
    the stream up to now, and misses nothing in between."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.projects: dict[str, ProjectStreams] = {}
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

    def subscribe(self, project: str, job_id: str | None) -> Subscription:
        """A new stream's subscription; OverQuota when the project has as many open as it may.
        The caller must `unsubscribe` it once the stream's response has ended, however it ended."""
        streams = self.projects.get(project)
        limit = self.settings.sse_max_streams_per_project
        if streams is not None and streams.open >= limit:
            raise OverQuota(
                f"This project already has {streams.open} open event streams, the most one server allows "
                f"({limit}); close one (GET /api/events follows every job of the project in one stream).",
                STREAMS_RETRY_AFTER_S,
            )
        if streams is None:
            streams = self.projects[project] = ProjectStreams()
        subscription = Subscription(project, job_id, self.settings.sse_client_buffer)
        streams.open += 1
        subscription.counted = True
        if self.closing:
            subscription.close()
            return subscription
        if job_id is None:
            streams.every_job.add(subscription)
        else:
            streams.by_job.setdefault(job_id, set()).add(subscription)
        subscription.indexed = True
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget the subscription (again: a no-op); its project's count goes down once."""
        self._unindex(subscription)
        if subscription.counted:
            subscription.counted = False
            streams = self.projects.get(subscription.project)
            if streams is not None:
                streams.open -= 1
                if streams.open <= 0:
                    del self.projects[subscription.project]

    def _unindex(self, subscription: Subscription) -> None:
        if not subscription.indexed:
            return
        subscription.indexed = False
        streams = self.projects.get(subscription.project)
        if streams is None:
            return
        if subscription.job_id is None:
            streams.every_job.discard(subscription)
        else:
            same_job = streams.by_job.get(subscription.job_id)
            if same_job is not None:
                same_job.discard(subscription)
                if not same_job:
                    del streams.by_job[subscription.job_id]

    def close(self) -> None:
        """End every stream (server shutdown); new ones end at once."""
        self.closing = True
        for streams in list(self.projects.values()):
            for subscription in [*streams.every_job, *(s for job in streams.by_job.values() for s in job)]:
                subscription.close()

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def deliver(self, entry_id: str, fields: Fields) -> None:
        streams = self.projects.get(fields.get("project", ""))
        if streams is None:
            return
        targets = [*streams.every_job, *streams.by_job.get(fields.get("job_id", ""), ())]
        if not targets:
            return
        entry = Entry(entry_id, fields)
        for subscription in targets:
            if not subscription.push(entry):
                self._unindex(subscription)

    async def _run(self) -> None:
        redis = connect(self.settings)  # dedicated: it blocks in XREAD most of the time
        try:
            while True:
                try:
                    if self.position is None:
                        last = await redis.xrevrange(keys.EVENTS_STREAM, "+", "-", count=1)
                        self.position = last[0][0] if last else "0-0"
                        self._ready.set()
                    response = await redis.xread({keys.EVENTS_STREAM: self.position}, count=READ_COUNT, block=5000)
                    for _stream, entries in response or []:
                        for entry_id, fields in entries:
                            self.position = entry_id
                            self.deliver(entry_id, fields)
                except (RedisError, OSError) as exc:
                    log.warning("live events: redis unavailable (%s); retrying", exc)
                    await asyncio.sleep(1.0)
        finally:
            await redis.aclose()


def chain_shutdown_signals(callback: Callable[[], None]) -> Callable[[], None]:
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
