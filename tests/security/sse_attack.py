"""What an attacker does to Server-Sent Events, and how to measure what it costs the gateway.

Shared by tests/security/test_sse_limits.py and the noisy-neighbour tests:

- `open_streams`: many event streams on raw sockets, each with a small receive buffer, that read the
  response head (to know the status) and then nothing, unless asked to. A reading client such as
  httpx keeps draining the socket into its own buffers, so it cannot play a client that stops reading.
- `flood_events`: entries of keys.EVENTS_STREAM with the fields `emit` (shared/lua/include/job_status.lua)
  writes, straight into Redis: thousands a second, where PATCH /api/jobs/{id} costs a request each.
- `flood_priority_changes`: the same flood the way a client makes it, priority changes of a queued job.
- `cpu_seconds`, `rss_bytes`, `RssPeak`: a process's CPU time and resident memory, from /proc.
"""

import asyncio
import json
import os
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis

from shared import keys

HEAD_END = b"\r\n\r\n"
SMALL_RCVBUF = 4096  # the kernel doubles it; a client that reads nothing then holds a few KiB
NETWORK_MSS = 1400  # TCP segment size of a client across a real network (Ethernet MTU)


@dataclass
class RawStream:
    """One event stream on a plain socket: the response head is read, the body only on demand."""

    sock: socket.socket
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytearray = field(default_factory=bytearray)  # body bytes received, still chunk-encoded

    def close(self) -> None:
        self.sock.close()

    def read_body(self, within: float) -> tuple[str, bool]:
        """Read until the server ends the response (its last chunk) or `within` seconds pass.
        Returns the decoded body so far and whether the server ended it."""
        deadline = time.monotonic() + within
        self.sock.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            while True:
                text, ended = decode_chunked(bytes(self.raw))
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    return text, ended
                if not selector.select(min(left, 0.5)):
                    continue
                try:
                    data = self.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed without the last chunk: cut short, but ended all the same
                    return decode_chunked(bytes(self.raw))[0], True
                self.raw += data


def decode_chunked(raw: bytes) -> tuple[str, bool]:
    """The body of a chunked response received so far, and whether its last (empty) chunk came."""
    out = bytearray()
    at = 0
    while True:
        line_end = raw.find(b"\r\n", at)
        if line_end < 0:
            break
        size = int(raw[at:line_end].split(b";", 1)[0] or b"0", 16)
        if size == 0:
            return out.decode(errors="replace"), True
        start = line_end + 2
        if len(raw) < start + size + 2:
            break
        out += raw[start : start + size]
        at = start + size + 2
    return out.decode(errors="replace"), False


def parse_events(text: str) -> list[dict[str, Any]]:
    """Whole events of an event-stream body: {"id", "event", "data"}; comments and a torn tail left out."""
    events = []
    for block in text.split("\n\n")[:-1]:
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = json.loads(value) if name == "data" else value
        if "event" in event:
            events.append(event)
    return events


def raise_open_files_limit(needed: int) -> None:
    """Each stream is a socket here and one in the gateway (a child of this process inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (min(needed, hard) if hard != resource.RLIM_INFINITY else needed, hard)
        )


def _connect(host: str, port: int, request: bytes, rcvbuf: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect: the window and segment size are agreed on then. Loopback's 64 KiB segments
    # would let the server's kernel buffer megabytes for a client that reads nothing (its send
    # buffer grows with segment size x congestion window); a real network's segments are ~1.4 KiB.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, NETWORK_MSS)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, port))
    sock.sendall(request)
    return sock


def _read_head(stream: RawStream, deadline: float) -> None:
    buffer = bytearray()
    stream.sock.settimeout(max(0.1, deadline - time.monotonic()))
    while HEAD_END not in buffer:
        data = stream.sock.recv(4096)
        if not data:
            break
        buffer += data
    head, _, rest = bytes(buffer).partition(HEAD_END)
    lines = head.decode("latin-1").split("\r\n")
    stream.status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        stream.headers[name.strip().lower()] = value.strip()
    stream.raw += rest
    if stream.status != 200:  # a refusal carries a short body of its own
        stream.sock.settimeout(0.5)
        try:
            while len(stream.raw) < int(stream.headers.get("content-length", "0")):
                more = stream.sock.recv(4096)
                if not more:
                    break
                stream.raw += more
        except TimeoutError:
            pass


def open_streams(
    gateway_url: str,
    api_key: str,
    count: int,
    *,
    path: str = "/api/events",
    last_event_id: str | None = None,
    rcvbuf: int | None = SMALL_RCVBUF,
    batch: int = 100,
    within: float = 60.0,
) -> list[RawStream]:
    """`count` event streams, each with its response head read (status, headers) and nothing more.
    Blocking: call it through asyncio.to_thread from a test."""
    raise_open_files_limit(2 * count + 1024)
    parts = urlsplit(gateway_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", f"Authorization: Bearer {api_key}"]
    lines += ["Accept: text/event-stream"] + ([f"Last-Event-ID: {last_event_id}"] if last_event_id else [])
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    deadline = time.monotonic() + within
    streams: list[RawStream] = []
    try:
        for start in range(0, count, batch):
            # A batch is sent before any answer is read, so the gateway serves it concurrently.
            opened = [RawStream(_connect(host, port, request, rcvbuf)) for _ in range(min(batch, count - start))]
            streams += opened
            for stream in opened:
                _read_head(stream, deadline)
    except BaseException:
        close_streams(streams)
        raise
    return streams


def close_streams(streams: list[RawStream]) -> None:
    for stream in streams:
        stream.close()


def event_fields(project: str, job_id: str, n: int) -> dict[str, str]:
    """What `emit` writes for a job's progress (every field a string, as Redis returns them)."""
    return {
        "job_id": job_id,
        "type": "progress",
        "project": project,
        "status": "processing",
        "images_total": "100000",
        "images_succeeded": str(n),
        "images_failed": "0",
        "runs_total": "25000",
        "runs_done": str(n // 4),
    }


async def flood_events(
    redis: Redis, project: str, count: int, *, job_id: str = "flood-job", batch: int = 500
) -> list[str]:
    """`count` progress events of `project` added to keys.EVENTS_STREAM; returns their ids, in order."""
    ids: list[str] = []
    for start in range(0, count, batch):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(start, min(count, start + batch)):
                pipe.xadd(keys.EVENTS_STREAM, event_fields(project, job_id, n))
            ids += [str(i) for i in await pipe.execute()]
    return ids


async def flood_priority_changes(api: httpx.AsyncClient, job_id: str, count: int, *, concurrency: int = 8) -> int:
    """`count` PATCH /api/jobs/{job_id} priority changes (each emits an event while the job is queued);
    returns how many were accepted."""
    accepted = 0
    next_n = iter(range(count))

    async def worker() -> None:
        nonlocal accepted
        for n in next_n:
            response = await api.patch(f"/api/jobs/{job_id}", json={"priority": n % 10})
            accepted += response.status_code == 200

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return accepted


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


class RssPeak:
    """The highest resident memory of a process while the `with` block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
