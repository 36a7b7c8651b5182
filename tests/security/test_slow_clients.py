"""Slow clients are dropped and cannot exhaust the gateway's file descriptors (services/gateway/server.py).

A gateway of its own, with short read timeouts so the tests are quick, and a second replica with
small caps. Timing bounds are generous: a loaded 2-core machine must pass every run.
"""

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from deploy.processes import ROOT
from deploy.stack import Stack
from services.gateway.server import FD_LIMIT_TARGET, FD_PER_REQUEST, FD_RESERVE, connection_cap
from tests.security.conftest import API_KEYS, KEY_A
from tests.security.slow import STALLED_HEADERS, body_head, open_fds, slow_attack
from tests.stack_helpers import png_bytes, running_stack

TIMEOUT = 3.0  # the header and body timeouts of the test gateway
MIN_RATE = 200  # bytes per second
CAPPED = 1  # the replica with small caps
MAX_CONNECTIONS, MAX_REQUESTS, KEEP_ALIVE = 40, 3, 1
AUTH = {"Authorization": f"Bearer {KEY_A}"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    timeouts = {
        "BUNCH_GATEWAY_HEADER_TIMEOUT_SECONDS": str(TIMEOUT),
        "BUNCH_GATEWAY_BODY_TIMEOUT_SECONDS": str(TIMEOUT),
        "BUNCH_GATEWAY_BODY_MIN_BYTES_PER_SECOND": str(MIN_RATE),
        "BUNCH_SSE_KEEPALIVE_SECONDS": "1",
    }
    with running_stack("bunch-slow-clients-", api_keys=API_KEYS, services=("gateway",), service_env=timeouts) as s:
        # Its own timeouts out of the way, so only the caps under test close anything.
        caps = {
            "BUNCH_GATEWAY_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "BUNCH_GATEWAY_MAX_CONCURRENT_REQUESTS": str(MAX_REQUESTS),
            "BUNCH_GATEWAY_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE),
            "BUNCH_GATEWAY_HEADER_TIMEOUT_SECONDS": "120",
            "BUNCH_GATEWAY_BODY_TIMEOUT_SECONDS": "120",
        }
        s.start_service("gateway", CAPPED, extra_env=caps)
        yield s


def gateway_pid(stack: Stack, replica: int = 0) -> int:
    popen = stack.processes[f"gateway-{replica}"].popen
    assert popen is not None
    return popen.pid


def address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


async def timed_gets(url: str, count: int) -> list[float]:
    """Seconds each of `count` authenticated requests took, over one new connection."""
    times = []
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as api:
        for _ in range(count):
            start = time.monotonic()
            response = await api.get("/api/jobs")
            times.append(time.monotonic() - start)
            assert response.status_code == 200, response.text
    return times


async def wait_for(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


async def test_stalled_headers_and_bodies_are_closed_and_their_fds_released(stack: Stack) -> None:
    pid = gateway_pid(stack)
    await timed_gets(stack.gateway_url, 5)  # warm-up: the Redis pool's first connection
    baseline = max(await timed_gets(stack.gateway_url, 20))
    fds_before = open_fds(pid)
    headers, bodies = 1000, 200
    with slow_attack(stack.gateway_url, headers, bodies, api_keys=(KEY_A, None)) as attack:
        peak = open_fds(pid)
        while peak < fds_before + headers + bodies - 20 and time.monotonic() - attack.started < TIMEOUT:
            await asyncio.sleep(0.05)  # until the gateway has accepted them (nearly) all
            peak = max(peak, open_fds(pid))
        during = await timed_gets(stack.gateway_url, 20)
        closed = await asyncio.to_thread(attack.wait_closed, TIMEOUT + 30)
        print(
            f"\nfds: {fds_before} before, {peak} under attack; connections closed after "
            f"{min(attack.closed_after.values()):.1f}-{max(attack.closed_after.values()):.1f} s; "
            f"requests meanwhile: max {max(during) * 1000:.0f} ms (baseline {baseline * 1000:.0f} ms)"
        )
        assert closed, f"{attack.open_count} of {headers + bodies} stalled connections still open"
        assert peak > fds_before + 600, "the attack did not hold the gateway's descriptors: the test proves nothing"
        assert max(during) < 2 * baseline + 2.0, (during, baseline)
        answers = [attack.answers[sock] for sock in attack.sockets]
    for i, answer in enumerate(answers[:headers]):
        # A begun request is told why; a connection that sent nothing is just closed.
        assert answer.startswith(b"HTTP/1.1 408 ") if STALLED_HEADERS[i % 3] else answer == b"", answer
    for i, answer in enumerate(answers[headers:]):
        # Unauthenticated, the 401 went out before the body; the stalled rest still ends the connection.
        assert answer.startswith(b"HTTP/1.1 401 " if i % 2 else b"HTTP/1.1 408 "), answer
    assert await wait_for(lambda: open_fds(pid) <= fds_before + 10, 15), (fds_before, open_fds(pid))
    assert "Traceback" not in stack.processes["gateway-0"].log_tail(400)


def _trickle(url: str, api_key: str, within: float) -> tuple[float, bytes]:
    """A body sent 1 byte every 0.25 s (4 B/s): never idle long, far below the minimum rate."""
    sock = socket.create_connection(address(url), timeout=10)
    start = time.monotonic()
    answer = b""
    try:
        sock.sendall(body_head("bunch", api_key, sent=0))
        while time.monotonic() - start < within:
            try:
                sock.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.settimeout(0.25)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            answer += data
            if not data:
                break
    finally:
        sock.close()
    return time.monotonic() - start, answer


async def test_a_body_trickled_below_the_minimum_rate_is_dropped(stack: Stack) -> None:
    took, answer = await asyncio.to_thread(_trickle, stack.gateway_url, KEY_A, TIMEOUT + 20)
    assert took < TIMEOUT + 15, f"a 4 B/s body was still accepted after {took:.1f} s"
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b"", answer


async def test_headers_over_the_size_limit_get_431(stack: Stack) -> None:
    with socket.create_connection(address(stack.gateway_url), timeout=TIMEOUT + 20) as sock:
        sock.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: bunch\r\nX-Big: " + b"a" * (100 * 1024))
        answer = await asyncio.to_thread(sock.recv, 65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer


async def test_headers_growing_behind_a_long_response_end_the_connection(stack: Stack) -> None:
    """A next request pipelined behind an event stream: its headers are capped too, although no
    timeout runs while the stream is sent."""
    with socket.create_connection(address(stack.gateway_url), timeout=TIMEOUT + 20) as sock:
        sock.sendall(f"GET /api/events HTTP/1.1\r\nHost: bunch\r\nAuthorization: Bearer {KEY_A}\r\n\r\n".encode())
        answer = await asyncio.to_thread(sock.recv, 65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        sock.sendall(b"GET /api/jobs HTTP/1.1\r\nX-Big: ")
        await asyncio.sleep(0.3)
        sock.sendall(b"a" * (100 * 1024))
        start = time.monotonic()
        while time.monotonic() - start < TIMEOUT + 10:
            try:
                if not await asyncio.to_thread(sock.recv, 65536):
                    return  # closed
            except ConnectionResetError:
                return
    raise AssertionError("the connection stayed open")


async def test_an_upload_that_keeps_sending_outlasts_the_timeouts(stack: Stack) -> None:
    image = png_bytes(700, 700, noise=True)
    boundary = "steadyupload"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    body = head + image + f"\r\n--{boundary}--\r\n".encode()
    chunk = len(body) // 25 + 1

    async def steadily() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), chunk):  # ~7.5 s in all, 0.3 s between chunks
            yield body[offset : offset + chunk]
            await asyncio.sleep(0.3)

    headers = {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(len(body))}
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=60) as api:
        response = await api.post("/api/uploads", content=steadily(), headers=headers)
    assert time.monotonic() - start > 2 * TIMEOUT, "the upload was too quick to test anything"
    assert response.status_code == 201, response.text


async def test_event_streams_are_not_cut_by_the_read_timeouts(stack: Stack) -> None:
    pings = 0
    start = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=stack.gateway_url, headers=AUTH, timeout=30) as api,
        api.stream("GET", "/api/events") as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            pings += line.startswith(":")
            if time.monotonic() - start > 2 * TIMEOUT + 1:
                break
    assert pings >= 3, "the stream stopped sending"


async def test_connections_over_the_cap_are_closed_at_once(stack: Stack) -> None:
    url = stack.gateway_url_of(CAPPED)
    pid = gateway_pid(stack, CAPPED)
    fds_before = open_fds(pid)
    with slow_attack(url, stalled_headers=MAX_CONNECTIONS + 30, stalled_bodies=0) as attack:
        # Its header timeout is 120 s: only the cap closes connections within these seconds.
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(attack.poll, 0.2) > MAX_CONNECTIONS and time.monotonic() < deadline:
            pass
        assert attack.open_count <= MAX_CONNECTIONS
        assert open_fds(pid) <= fds_before + MAX_CONNECTIONS + 2
    await timed_gets(url, 1)  # served again once they are gone


async def test_the_concurrency_cap_counts_requests_not_connections(stack: Stack) -> None:
    url = stack.gateway_url_of(CAPPED)
    with slow_attack(url, stalled_headers=10, stalled_bodies=0):
        await timed_gets(url, 3)  # idle connections do not count (uvicorn's limit_concurrency would 503)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as api:
        # Event streams have a cap of their own: as many as the request cap leave requests served.
        streams = [api.stream("GET", "/api/events") for _ in range(MAX_REQUESTS)]
        responses = [await stream.__aenter__() for stream in streams]
        try:
            assert [r.status_code for r in responses] == [200] * MAX_REQUESTS
            await timed_gets(url, 2)
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
    await asyncio.sleep(1.0)  # the streams' tasks wound down: they are not in the app any more
    # Uploads whose bodies are still coming are requests in the app: they fill the cap.
    with slow_attack(url, stalled_headers=0, stalled_bodies=MAX_REQUESTS, api_keys=(KEY_A,)) as uploads:
        await asyncio.sleep(1.0)  # their headers are in: the app is reading their bodies
        uploads.poll(0.1)
        assert not any(uploads.answers.values()), "an upload was answered before its body came"
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as other:
            assert (await other.get("/api/jobs")).status_code == 503

    async def served() -> bool:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as other:
            return (await other.get("/api/jobs")).status_code == 200

    deadline = time.monotonic() + 15
    while not await served():
        assert time.monotonic() < deadline, "still refused after the streams ended"
        await asyncio.sleep(0.2)


async def test_an_idle_keep_alive_connection_is_closed(stack: Stack) -> None:
    with socket.create_connection(address(stack.gateway_url_of(CAPPED)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bunch\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        start = time.monotonic()
        while data := await asyncio.to_thread(sock.recv, 65536):
            answer += data
        idle = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert idle < KEEP_ALIVE + 3, f"an idle connection stayed {idle:.1f} s (uvicorn's default is 5 s)"


def test_the_connection_cap_leaves_room_for_requests_below_the_fd_limit() -> None:
    assert connection_cap(4096, 512, 20000) == 4096
    assert connection_cap(1000, 100, 1000 + FD_RESERVE + 100 * FD_PER_REQUEST) == 1000
    assert connection_cap(4096, 100, 2000) == 2000 - FD_RESERVE - 100 * FD_PER_REQUEST
    assert connection_cap(4096, 512, 1024) == 1024 // 4  # requests alone would take every fd


def test_the_gateway_raises_its_soft_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard RLIMIT_NOFILE is {hard}: nothing to raise to")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    code = "from services.gateway.server import raise_fd_limit; print(raise_fd_limit())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUNCH_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, preexec_fn=low_soft_limit, capture_output=True, check=True
    )
    expected = FD_LIMIT_TARGET if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_TARGET)
    assert int(out.stdout) == expected
