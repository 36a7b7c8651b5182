"""Server-Sent Events under attack, on a real gateway (redis-server and the gateway process).

An event stream must cost the gateway nothing while idle, a bounded amount while its client does not
read, and the same per event however many streams other projects hold; a project may hold only so
many; and a client cut for falling behind resumes with Last-Event-ID without missing anything.
Costs are the gateway's own CPU seconds and resident memory (/proc), compared with and without the
attack, with bounds several times what the protection costs and well below what its absence costs
(figures in each test), so a loaded machine passes and a missing protection fails.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from tests.security.sse_attack import (
    RawStream,
    RssPeak,
    close_streams,
    cpu_seconds,
    flood_events,
    open_streams,
    parse_events,
    raise_open_files_limit,
    rss_bytes,
)
from tests.stack_helpers import client, redis_of, running_stack, submit

PROJECTS = ("idle-a", "idle-b", "limited", "neighbour", "attacker", "resume", "busy")
KEY = {project: f"sse-key-{project}" for project in PROJECTS}
IDLE = 500  # streams of each of two projects: 1,000 at once
LIMIT = 600  # BUNCH_SSE_MAX_STREAMS_PER_PROJECT
BUFFER = 1000  # BUNCH_SSE_CLIENT_BUFFER
SLOW = 500  # streams that never read
MIB = 1024 * 1024

# Over WINDOW_S, 1,000 idle streams may add at most this much gateway CPU. Polling each stream once
# a second for a disconnected client cost ~1 s here (waking each once a second, ~0.35 s); sleeping
# until something happens, ~0.01 s.
WINDOW_S = 5.0
IDLE_CPU_BOUND_S = 0.1
# 500 streams that never read, and FLOOD events of their project: resident memory may grow at most
# this much. Each stalled stream holds at most uvloop's 64 KiB transport buffer and BUFFER entries
# (shared with every other stream) before it is cut: ~50 MiB in all here. With a 10,000-event buffer
# per client it grew by >130 MiB after 4,000 events; with no bound, by ~3 MiB more per 1,000 events.
FLOOD = 15_000
RSS_BOUND = 75 * MIB
# BUSY_FLOOD events of one project, read by one stream, with 1,000 streams of other projects open
# or not: matching every event against every stream cost ~1.5 s more CPU; the index, ~nothing.
BUSY_FLOOD = 10_000


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    raise_open_files_limit(8 * (2 * IDLE + LIMIT))  # the gateway inherits it
    with running_stack(
        "bunch-sse-limits-",
        api_keys=",".join(f"{KEY[p]}:{p}" for p in PROJECTS),
        services=("gateway",),
        service_env={
            "BUNCH_SSE_KEEPALIVE_SECONDS": "120",  # no pings within a measurement
            "BUNCH_SSE_MAX_STREAMS_PER_PROJECT": str(LIMIT),
            "BUNCH_SSE_CLIENT_BUFFER": str(BUFFER),
            # The server's own caps are not what is tested here; its one-off header timer per
            # connection fires before a measurement starts.
            "BUNCH_GATEWAY_MAX_CONCURRENT_REQUESTS": "8000",
            "BUNCH_GATEWAY_MAX_CONNECTIONS": "8000",
            "BUNCH_GATEWAY_HEADER_TIMEOUT_SECONDS": "2",
        },
    ) as stack:
        yield stack


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as connection:
        yield connection


def gateway_pid(stack: Stack) -> int:
    popen = stack.processes["gateway-0"].popen
    assert popen is not None
    return popen.pid


async def opened(stack: Stack, project: str, count: int, **options: Any) -> list[RawStream]:
    return await asyncio.to_thread(open_streams, stack.gateway_url, KEY[project], count, **options)


async def cpu_over(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return cpu_seconds(pid) - before


async def read_events(api: httpx.AsyncClient, *, after: str, count: int, within: float = 60) -> list[str]:
    """The ids of the first `count` events of GET /api/events resumed after `after`."""
    ids: list[str] = []
    async with asyncio.timeout(within), api.stream("GET", "/api/events", headers={"Last-Event-ID": after}) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                ids.append(line.removeprefix("id: "))
                if len(ids) == count:
                    return ids
    raise AssertionError(f"the stream ended after {len(ids)} of {count} events")


async def flood_while_reading(
    api: httpx.AsyncClient, redis: Redis, project: str, count: int, *, others: tuple[str, int] | None = None
) -> list[str]:
    """Add `count` events of `project` (in batches with `others`' events in between) while a client
    follows the project live. Once that client got the last (the hub read them all), returns the ids of
    every event of `project` the flood added: a first one to start from, then the `count`."""
    start = (await flood_events(redis, project, 1))[0]
    reader = asyncio.create_task(read_events(api, after=start, count=count))
    await asyncio.sleep(0.5)  # connected: it gets the flood from the hub, as the other streams do
    ids: list[str] = []
    while len(ids) < count:
        ids += await flood_events(redis, project, min(BUFFER, count - len(ids)))
        if others is not None:
            await flood_events(redis, *others)
    assert await reader == ids
    return [start, *ids]


def read_bodies(streams: list[RawStream], within: float) -> list[tuple[str, bool]]:
    deadline = time.monotonic() + within
    return [stream.read_body(within=max(0.1, deadline - time.monotonic())) for stream in streams]


async def wait_for_places(stack: Stack, project: str, count: int, within: float = 20) -> list[RawStream]:
    """`count` new streams of `project`, once its earlier streams' places are free again."""
    deadline = time.monotonic() + within
    while True:
        streams = await opened(stack, project, count)
        refused = sum(s.status != 200 for s in streams)
        if not refused:
            return streams
        close_streams(streams)
        assert time.monotonic() < deadline, f"{refused} of {count} places of {project} still taken after {within} s"
        await asyncio.sleep(1.0)


async def test_idle_streams_cost_no_cpu(stack: Stack) -> None:
    pid = gateway_pid(stack)
    alone = await cpu_over(pid, WINDOW_S)
    streams = await wait_for_places(stack, "idle-a", IDLE) + await wait_for_places(stack, "idle-b", IDLE)
    try:
        assert [s.status for s in streams] == [200] * len(streams)
        await asyncio.sleep(3.0)  # the last snapshots go out, the header timers fire
        held = await cpu_over(pid, WINDOW_S)
    finally:
        close_streams(streams)
    print(f"gateway CPU over {WINDOW_S:.0f} s: {alone:.3f} s alone, {held:.3f} s with {len(streams)} idle streams")
    assert held - alone < IDLE_CPU_BOUND_S, f"{len(streams)} idle streams cost {held - alone:.2f} s of CPU"


async def test_an_event_costs_the_same_however_many_streams_other_projects_hold(stack: Stack, redis: Redis) -> None:
    pid = gateway_pid(stack)

    async def flood_cost() -> float:
        async with client(stack, KEY["busy"]) as api:
            before = cpu_seconds(pid)
            await flood_while_reading(api, redis, "busy", BUSY_FLOOD)
            return cpu_seconds(pid) - before

    await asyncio.sleep(1.0)  # streams closed before are gone
    alone = await flood_cost()
    others = await wait_for_places(stack, "idle-a", IDLE) + await wait_for_places(stack, "idle-b", IDLE)
    try:
        assert [s.status for s in others] == [200] * len(others)
        await asyncio.sleep(1.0)
        crowded = await flood_cost()
    finally:
        close_streams(others)
    print(f"gateway CPU for {BUSY_FLOOD} events: {alone:.2f} s, {crowded:.2f} s with {len(others)} other streams")
    assert crowded - alone < max(0.5, alone), f"other projects' streams added {crowded - alone:.2f} s of CPU"


async def test_a_project_over_its_stream_limit_gets_429_and_others_still_connect(stack: Stack) -> None:
    async with client(stack, KEY["limited"]) as api:
        job_id = await submit(api, {"mode": "semi_auto", "prompts": ["stays queued"], "images_per_prompt": 1})
    job_path = f"/api/jobs/{job_id}/events"
    held = await opened(stack, "limited", LIMIT - 1) + await opened(stack, "limited", 1, path=job_path)
    try:
        assert [s.status for s in held] == [200] * LIMIT
        for path in ("/api/events", job_path):  # both kinds count, and are refused
            over = (await opened(stack, "limited", 1, path=path))[0]
            over.close()
            assert over.status == 429, over.status
            assert int(over.headers["retry-after"]) >= 1
            detail = json.loads(bytes(over.raw))["detail"]
            assert f"already has {LIMIT} open event streams" in detail, detail
        neighbour = await opened(stack, "neighbour", 3)
        close_streams(neighbour)
        assert [s.status for s in neighbour] == [200] * 3
    finally:
        close_streams(held)
    # Every place is free again once those clients are gone.
    close_streams(await wait_for_places(stack, "limited", LIMIT))


async def test_streams_that_stop_reading_are_cut_and_memory_stays_bounded(stack: Stack, redis: Redis) -> None:
    pid = gateway_pid(stack)
    slow = await opened(stack, "attacker", SLOW)
    try:
        assert [s.status for s in slow] == [200] * SLOW
        await asyncio.sleep(1.0)
        before = rss_bytes(pid)
        async with client(stack, KEY["attacker"]) as api:
            with RssPeak(pid) as rss:
                # The client that reads gets every event, however slow the others are.
                ids = await flood_while_reading(api, redis, "attacker", FLOOD)
                await asyncio.sleep(1.0)
        growth = rss.peak - before
        print(f"gateway RSS {before / MIB:.0f} MiB, +{growth / MIB:.1f} MiB: {SLOW} stalled streams, {FLOOD} events")
        assert growth < RSS_BOUND, f"the gateway grew by {growth / MIB:.0f} MiB"

        # Each stalled stream was cut: once its client reads, what was sent is followed by the end.
        bodies = await asyncio.to_thread(read_bodies, slow, 60)
        assert sum(ended for _, ended in bodies) == SLOW
        for text, _ in bodies:
            sent = [e["id"] for e in parse_events(text) if e["event"] != "snapshot"]
            assert sent == ids[: len(sent)] and len(sent) < len(ids), "not cut, or not in order"
    finally:
        close_streams(slow)
    # The cut streams' places are free again.
    close_streams(await wait_for_places(stack, "attacker", LIMIT))


async def test_a_cut_client_resumes_with_last_event_id_and_misses_nothing(stack: Stack, redis: Redis) -> None:
    slow = await opened(stack, "resume", 5)
    try:
        assert [s.status for s in slow] == [200] * 5
        async with client(stack, KEY["resume"]) as api:
            ids = await flood_while_reading(api, redis, "resume", 3 * BUFFER, others=("neighbour", 200))
            await asyncio.sleep(1.0)
            for stream in slow:
                text, ended = await asyncio.to_thread(stream.read_body, 30)
                assert ended, f"a client {len(ids)} events behind was not cut"
                events = parse_events(text)
                assert events[0]["event"] == "snapshot"
                sent = [e["id"] for e in events[1:]]
                missed = ids[len(sent) :]
                assert sent == ids[: len(sent)] and missed, "not cut, or not in order"
                resumed = await read_events(api, after=sent[-1] if sent else events[0]["id"], count=len(missed))
                assert resumed == missed  # every event once, in order
    finally:
        close_streams(slow)
