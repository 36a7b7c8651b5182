"""Slow-client attacks on a gateway, over raw sockets: requests that are begun and never finished.

    with slow_attack(stack.gateway_url, stalled_headers=1000, stalled_bodies=200, api_keys=(KEY, None)) as attack:
        ...                                   # the gateway is under attack here
        attack.wait_closed(within=30)         # True once the server has closed every one of them

Stalled headers: a third connect and send nothing, a third send part of a request line, a third a
request line and headers without their end. Stalled bodies: the headers of a multipart upload with
its Content-Length, the first 32 KiB of the body, then nothing; `api_keys` are cycled over them
(None: no Authorization header, so the gateway answers 401 before reading the body). The blocking
calls (`open_attack`, `wait_closed`) are quick or belong in `asyncio.to_thread` in async tests.
"""

import contextlib
import os
import resource
import selectors
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

BOUNDARY = "slowclientboundary"
STALLED_HEADERS = (
    b"",
    b"GET /api/jo",
    b"GET /api/jobs HTTP/1.1\r\nHost: bunch\r\nUser-Agent: slow\r\nX-Slow: ",
)
DECLARED_BODY = 1024 * 1024
# Enough that a minimum body rate would allow a long stall: only the idle timeout drops these.
SENT_BODY = 32 * 1024


def ensure_fd_limit(needed: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to cover `needed` sockets, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256  # the test's own files, the stack's pipes and clients
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}: this machine cannot open {needed} sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def body_head(host: str, api_key: str | None, length: int = DECLARED_BODY, sent: int = SENT_BODY) -> bytes:
    """The headers of a one-file upload declaring `length` bytes, and the first ~`sent` of them."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: {host}\r\n{auth}"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
    )
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="slow.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + part.encode() + b"\x89PNG\r\n\x1a\n" + bytes(sent)


@dataclass
class SlowAttack:
    sockets: list[socket.socket]
    started: float = field(default_factory=time.monotonic)
    # Per socket still of the attack's: what the server sent, and when it closed the connection.
    answers: dict[socket.socket, bytes] = field(default_factory=dict)
    closed_after: dict[socket.socket, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._selector = selectors.DefaultSelector()  # epoll: select() cannot watch fds past 1024
        for sock in self.sockets:
            sock.setblocking(False)
            self.answers[sock] = b""
            self._selector.register(sock, selectors.EVENT_READ)

    @property
    def open_count(self) -> int:
        return len(self.sockets) - len(self.closed_after)

    def poll(self, timeout: float = 0.0) -> int:
        """Note what the server sent or closed within `timeout` seconds; the connections still open."""
        for key, _ in self._selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except BlockingIOError:
                continue
            if data:
                self.answers[sock] += data
                continue
            self.closed_after[sock] = time.monotonic() - self.started
            self._selector.unregister(sock)
        return self.open_count

    def wait_closed(self, within: float) -> bool:
        """Until the server has closed every connection (True), or `within` seconds passed."""
        deadline = time.monotonic() + within
        while self.poll(min(0.5, max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
            pass
        return self.open_count == 0

    def close(self) -> None:
        self._selector.close()
        for sock in self.sockets:
            sock.close()


def _connect(host: str, port: int, first: bytes) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    if first:
        sock.sendall(first)
    return sock


def open_attack(
    url: str, stalled_headers: int = 1000, stalled_bodies: int = 200, api_keys: Sequence[str | None] = (None,)
) -> SlowAttack:
    """Open the connections of the attack and leave them stalled (the caller closes them)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    ensure_fd_limit(stalled_headers + stalled_bodies)
    started = time.monotonic()
    sockets: list[socket.socket] = []
    try:
        for i in range(stalled_headers):
            sockets.append(_connect(host, port, STALLED_HEADERS[i % len(STALLED_HEADERS)]))
        for i in range(stalled_bodies):
            sockets.append(_connect(host, port, body_head(host, api_keys[i % len(api_keys)])))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return SlowAttack(sockets, started)


@contextlib.contextmanager
def slow_attack(
    url: str, stalled_headers: int = 1000, stalled_bodies: int = 200, api_keys: Sequence[str | None] = (None,)
) -> Iterator[SlowAttack]:
    attack = open_attack(url, stalled_headers, stalled_bodies, api_keys)
    try:
        yield attack
    finally:
        attack.close()


def open_fds(pid: int) -> int:
    """Open file descriptors of a process (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
