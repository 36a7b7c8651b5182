"""The gateway's HTTP server: uvicorn, with the read timeouts and caps it lacks.

A client that never finishes its request must not hold a connection (a file descriptor, a parser,
a request task) for ever. uvicorn only has an idle keep-alive timeout, so its httptools protocol is
extended here:

- header timeout: a request's headers must be complete `gateway_header_timeout_seconds` after the
  connection opened or the previous response ended (408 if a request had begun, else just closed);
  sending bytes slowly does not extend it. Headers over MAX_HEAD_BYTES get 431 (or, if they grow
  behind a response still being sent, end the connection).
- body timeout: while the gateway waits for body bytes, `gateway_body_timeout_seconds` without one
  drops the request, and so does a body slower on average than `gateway_body_min_bytes_per_second`
  once that first timeout has passed (each byte buys 1/rate seconds more, as Apache's mod_reqtimeout
  does). The app's `receive()` then returns `http.disconnect`. The clock stops while the gateway
  itself holds the body back (reading paused because the app has not taken the last chunk yet, or
  `Expect: 100-continue` not answered yet), so a slow app never drops a fast client. Uploads that
  keep sending faster than the minimum rate are never cut, however long they take.
- nothing times out once a request has been read: Server-Sent Events and long downloads stream as
  long as the client reads them. Idle keep-alive connections close after
  `gateway_keep_alive_seconds` (uvicorn's own timer).
- at most `gateway_max_connections` open connections: more are closed at once, so descriptors stay
  bounded. The soft RLIMIT_NOFILE is raised at start and the cap lowered to fit it
  (`connection_cap`); past it accept() would fail with EMFILE and stall every client.
- at most `gateway_max_concurrent_requests` requests in the app at once, event streams left out
  (they have their own per-project cap); more get 503. uvicorn's own `limit_concurrency` is not
  used: it counts open connections too, so idle or stalled ones would turn every real request away.
"""

import asyncio
import logging
import math
import resource
from asyncio.events import TimerHandle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import uvicorn
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.flow_control import FlowControl, service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from shared.settings import Settings

log = logging.getLogger(__name__)

# A request line and headers larger than this get 431: real clients send a few KiB (nginx allows
# 32 KiB), and a connection still sending headers holds all of them in memory.
MAX_HEAD_BYTES = 64 * 1024
# Descriptors kept for everything but client connections: redis and S3 connections, spooled upload
# files, logs, the listening socket. An in-flight request may hold a Redis connection and a file or
# an S3 connection at once.
FD_RESERVE = 256
FD_PER_REQUEST = 2
FD_LIMIT_TARGET = 65536  # raising the soft limit further gains nothing at these caps
LOG_EVERY_SECONDS = 10.0
EVENT_STREAM_SUFFIX = "/events"  # GET /api/events and /api/jobs/{id}/events


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float
    body_timeout: float
    body_min_rate: float  # bytes per second; 0: no minimum
    max_connections: int
    max_requests: int


class Tally:
    """Counts connections dropped and requests refused by reason; under attack these come by the
    thousand, so one summary line is logged at most every LOG_EVERY_SECONDS."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.logged_at = -math.inf
        self.flush_at: TimerHandle | None = None

    def note(self, reason: str, loop: asyncio.AbstractEventLoop) -> None:
        self.counts[reason] += 1
        if loop.time() - self.logged_at >= LOG_EVERY_SECONDS:
            self.flush(loop)
        elif self.flush_at is None:
            self.flush_at = loop.call_at(self.logged_at + LOG_EVERY_SECONDS, self.flush, loop)

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.flush_at is not None:
            self.flush_at.cancel()
            self.flush_at = None
        if self.counts:
            summary = ", ".join(f"{count} {what}" for what, count in self.counts.items())
            log.warning("slow or excess clients: %s (one such line every %.0f s at most)", summary, LOG_EVERY_SECONDS)
            self.counts.clear()
            self.logged_at = loop.time()


class _Flow(FlowControl):
    """uvicorn's flow control, telling the protocol when reading stops and when the app asks for more."""

    def __init__(self, transport: asyncio.Transport, paused: Callable[[], None], resumed: Callable[[], None]) -> None:
        super().__init__(transport)
        self._paused = paused
        self._resumed = resumed

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._paused()
        super().pause_reading()

    def resume_reading(self) -> None:
        super().resume_reading()
        self._resumed()


class OpenStreams:
    """Event streams in the app now, which the request cap leaves out."""

    def __init__(self) -> None:
        self.open = 0

    def counted(self, app: ASGI3Application) -> ASGI3Application:
        async def stream(scope: Any, receive: Any, send: Any) -> None:
            self.open += 1
            try:
                await app(scope, receive, send)
            finally:
                self.open -= 1

        return stream


class GuardedHttpProtocol(HttpToolsProtocol):
    """One client connection. A single timer per connection, re-armed lazily: it fires at the earliest
    moment a timeout could have passed, and `_check` decides from the connection's state."""

    limits: ClassVar[ServerLimits]
    tally: ClassVar[Tally]
    streams: ClassVar[OpenStreams]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        self._timer: TimerHandle | None = None
        # Waiting for headers: until when; bytes of them so far; whether a request line has begun.
        self._head_deadline: float | None = None
        self._head_bytes = 0
        self._request_begun = False
        # Reading a body: when the gateway started waiting for it (None: not waiting now), seconds
        # waited before that, bytes received, and when the last bytes came.
        self._reading_body = False
        self._body_clock: float | None = None
        self._body_waited = 0.0
        self._body_bytes = 0
        self._last_read = 0.0

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            transport.close()
            self.tally.note("connections refused over the cap", self.loop)
            return
        super().connection_made(transport)
        self.flow = _Flow(transport, self._reading_paused, self._reading_resumed)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        # Bytes count towards the headers' size while headers are awaited, or a next request has
        # begun behind a long response (pipelined). A chunk that starts the wait (the end of a body)
        # is left out: it mostly belongs to what came before.
        counting = self._head_deadline is not None or self._request_begun
        super().data_received(data)
        counting = counting and (self._head_deadline is not None or self._request_begun)
        if counting and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.tally.note("requests with headers over the size limit (431)", self.loop)
                if self.cycle is None or self.cycle.response_complete:  # never inside another response
                    self._answer(431, "Request headers too large.")
                self.transport.close()

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        now = self.loop.time()
        self._head_deadline = None
        self._head_bytes = 0
        self._request_begun = False
        self._reading_body = True
        self._body_waited = 0.0
        self._body_bytes = 0
        self._last_read = now
        waiting = not self.flow.read_paused and not self.cycle.waiting_for_100_continue
        self._body_clock = now if waiting else None
        self._schedule(now + self.limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_body = False
        self._body_clock = None
        # A response sent before the body was all in (401, 413): the connection is idle only now,
        # and the body's bytes cancelled uvicorn's keep-alive timer.
        if self.cycle.response_complete and not self.pipeline:
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
            self._await_headers()

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if not queued and not self._reading_body and not self.transport.is_closing():
            self._await_headers()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is self.app and cycle.scope["path"].endswith(EVENT_STREAM_SUFFIX):
            # Event streams last as long as their clients; they have their own per-project cap
            # (BUNCH_SSE_MAX_STREAMS_PER_PROJECT) and must not crowd ordinary requests out of this one.
            app = self.streams.counted(app)
        elif app is self.app and len(self.tasks) - self.streams.open >= self.limits.max_requests:
            self.tally.note("requests refused over the concurrency cap (503)", self.loop)
            app = service_unavailable
        super()._start_asgi_task(cycle, app)

    # --- timeouts ---

    def _await_headers(self) -> None:
        now = self.loop.time()
        self._head_deadline = now + self.limits.header_timeout
        self._schedule(self._head_deadline)

    def _reading_paused(self) -> None:
        if self._body_clock is not None:
            self._body_waited += self.loop.time() - self._body_clock
            self._body_clock = None

    def _reading_resumed(self) -> None:
        if self._reading_body and self._body_clock is None and not self.cycle.waiting_for_100_continue:
            now = self.loop.time()
            self._body_clock = now
            self._schedule(now + self.limits.body_timeout)

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._head_deadline is not None:
            if now < self._head_deadline:
                self._schedule(self._head_deadline)
            elif self._request_begun:
                self.tally.note("requests without complete headers in time (408)", self.loop)
                self._answer(408, "Request headers not received in time.")
                self.transport.close()
            else:
                self.tally.note("connections idle without a request", self.loop)
                self.transport.close()
            return
        if not self._reading_body or self._body_clock is None:
            return  # nothing awaited from the client: a paused read re-arms on resume
        limits = self.limits
        left = max(self._last_read, self._body_clock) + limits.body_timeout - now
        if limits.body_min_rate > 0:
            waited = self._body_waited + now - self._body_clock
            left = min(left, limits.body_timeout + self._body_bytes / limits.body_min_rate - waited)
        if left > 0:
            self._schedule(now + left)
            return
        self.tally.note("requests whose body stalled or came too slowly (408)", self.loop)
        self._drop_request()

    def _drop_request(self) -> None:
        """End a request whose body stopped coming: its app sees `http.disconnect`."""
        cycle = self.cycle
        if not cycle.response_complete:
            if not cycle.response_started:
                self._answer(408, "Request body not received in time.")
            cycle.disconnected = True  # the app's own answer, if any, is dropped
            cycle.message_event.set()
        self.transport.close()

    def _answer(self, status: int, message: str) -> None:
        body = message.encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: text/plain; charset=utf-8\r\n", b"content-length: %d\r\n" % len(body)]
        self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard one (containers often start at 1024); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_TARGET)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("could not raise RLIMIT_NOFILE from %d to %d", soft, target)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FD_LIMIT_TARGET if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int, max_requests: int, fd_limit: int) -> int:
    """The connections that fit in `fd_limit` next to what in-flight requests and the process hold.
    Past the limit accept() fails with EMFILE and the server stops accepting for a second at a time."""
    room = fd_limit - FD_RESERVE - FD_PER_REQUEST * max_requests
    if room >= wanted:
        return wanted
    cap = max(room, fd_limit // 4)
    log.warning(
        "RLIMIT_NOFILE is %d: at most %d client connections instead of BUNCH_GATEWAY_MAX_CONNECTIONS=%d; "
        "raise the nofile limit of the container to at least %d",
        fd_limit,
        cap,
        wanted,
        wanted + FD_RESERVE + FD_PER_REQUEST * max_requests,
    )
    return cap


def limits_of(settings: Settings, fd_limit: int) -> ServerLimits:
    max_requests = settings.gateway_max_concurrent_requests
    return ServerLimits(
        header_timeout=settings.gateway_header_timeout_seconds,
        body_timeout=settings.gateway_body_timeout_seconds,
        body_min_rate=settings.gateway_body_min_bytes_per_second,
        max_connections=connection_cap(settings.gateway_max_connections, max_requests, fd_limit),
        max_requests=max_requests,
    )


def protocol_for(limits: ServerLimits) -> type[GuardedHttpProtocol]:
    """The protocol class uvicorn instantiates per connection (it takes a class, not a factory)."""
    shared = {"limits": limits, "tally": Tally(), "streams": OpenStreams()}
    return type("GatewayHttpProtocol", (GuardedHttpProtocol,), shared)


def run(app: Any, host: str, port: int, settings: Settings) -> None:
    limits = limits_of(settings, raise_fd_limit())
    log.info("gateway server limits: %s", limits)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        http=protocol_for(limits),
        ws="none",  # the gateway serves no WebSockets: an Upgrade is answered as plain HTTP
        timeout_keep_alive=settings.gateway_keep_alive_seconds,
    )
