"""Server-Sent Events on the real stack: GET /api/jobs/{id}/events and GET /api/events."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from tests.stack_helpers import client, redis_of, running_stack, submit

KEY_A, KEY_B, KEY_C, KEY_D = "ev-key-a", "ev-key-b", "ev-key-c", "ev-key-d"
PROJECT_A, PROJECT_B, PROJECT_D = "ev-project-a", "ev-project-b", "ev-project-d"
FINAL = {"completed", "failed", "canceled"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-events-",
        api_keys=f"{KEY_A}:{PROJECT_A},{KEY_B}:{PROJECT_B},{KEY_C}:ev-project-c,{KEY_D}:{PROJECT_D}",
        service_env={
            "BUNCH_MAX_CONCURRENCY": "2",
            "BUNCH_SSE_KEEPALIVE_SECONDS": "1",
            "BUNCH_WEBHOOK_GRACE_SECONDS": "3",
            "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
        },
    ) as stack:
        yield stack


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as connection:
        yield connection


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parse an event stream: yields {"id", "event", "data"} for events and {"comment"} for comments."""
    assert response.status_code == 200, response.status_code
    assert response.headers["content-type"].startswith("text/event-stream")
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "event" in event:
                yield event
            event = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[name] = json.loads(value) if name == "data" else value


async def read_events(
    api: httpx.AsyncClient,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
    until: Any = None,
    within: float = 30,
) -> list[dict[str, Any]]:
    """Events (comments left out) until the server ends the stream, `stop_after` events or `until(event)`."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(within), api.stream("GET", path, headers=headers or {}) as response:
        async for event in sse(response):
            if "comment" in event:
                continue
            events.append(event)
            if (stop_after is not None and len(events) >= stop_after) or (until is not None and until(event)):
                break
    return events


def sid(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


async def stream_entries(redis: Redis, job_id: str, after: str) -> list[tuple[str, dict[str, str]]]:
    return [
        (i, f) for i, f in await redis.xrange(keys.EVENTS_STREAM, min=f"({after}", max="+") if f["job_id"] == job_id
    ]


def as_entries(events: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    return [(e["id"], e["event"], e["data"]["status"], e["data"]["images_succeeded"]) for e in events]


def expected(entries: list[tuple[str, dict[str, str]]]) -> list[tuple[str, str, str, int]]:
    return [(i, f["type"], f["status"], int(f["images_succeeded"])) for i, f in entries]


def slow_job(images: int, sleep_ms: int = 250, prompt: str = "sse") -> dict[str, Any]:
    return {"mode": "semi_auto", "prompts": [f"[emu:sleep={sleep_ms}] {prompt}"], "images_per_prompt": images}


async def test_job_stream_sends_progress_then_final_status_with_increasing_ids(stack: Stack, redis: Redis) -> None:
    api = client(stack, KEY_A)
    job_id = await submit(api, slow_job(12))
    events = await read_events(api, f"/api/jobs/{job_id}/events")  # ends by itself at the final status

    snapshot, live = events[0], events[1:]
    assert snapshot["event"] == "snapshot" and snapshot["data"]["job_id"] == job_id
    assert snapshot["data"]["images_total"] == 12
    assert [e["event"] for e in live].count("progress") >= 1, events
    assert live[-1]["event"] == "status" and live[-1]["data"]["status"] == "completed"
    assert live[-1]["data"]["images_succeeded"] == 12
    assert all(e["data"]["job_id"] == job_id and e["data"]["project"] == PROJECT_A for e in live)
    ids = [sid(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids
    # Exactly what the stream holds for this job after the snapshot, nothing left out, nothing added.
    assert as_entries(live) == expected(await stream_entries(redis, job_id, snapshot["id"]))


async def test_reconnecting_with_last_event_id_sees_every_event_once_in_order(stack: Stack, redis: Redis) -> None:
    api = client(stack, KEY_A)
    job_id = await submit(api, slow_job(32, sleep_ms=400, prompt="reconnect"))
    path = f"/api/jobs/{job_id}/events"

    # Snapshot and the first live event, then the client goes away mid-job.
    first = await read_events(api, path, stop_after=2)
    assert first[0]["event"] == "snapshot" and first[1]["event"] in ("status", "progress")
    await asyncio.sleep(0.7)  # events keep happening while nobody listens
    missed_until = (await redis.xrevrange(keys.EVENTS_STREAM, "+", "-", count=1))[0][0]
    status = (await api.get(f"/api/jobs/{job_id}/status")).json()
    assert status["status"] not in FINAL, "the job finished too soon to test a reconnect mid-job"

    second = await read_events(api, path, headers={"Last-Event-ID": first[-1]["id"]})
    assert second and all(e["event"] != "snapshot" for e in second)
    assert any(sid(e["id"]) <= sid(missed_until) for e in second), "nothing was replayed from the stream"
    assert second[-1]["data"]["status"] == "completed"

    received = first[1:] + second
    ids = [e["id"] for e in received]
    assert len(set(ids)) == len(ids) and [sid(i) for i in ids] == sorted(sid(i) for i in ids)
    assert as_entries(received) == expected(await stream_entries(redis, job_id, first[0]["id"]))

    # The query parameter does the same for clients that cannot set headers.
    middle = received[len(received) // 2]["id"]
    tail = await read_events(api, f"{path}?last_event_id={middle}")
    assert as_entries(tail) == as_entries(received[len(received) // 2 + 1 :])

    # Resuming a finished job's stream with nothing left: 204 tells EventSource to stop reconnecting.
    done = await api.get(path, headers={"Last-Event-ID": received[-1]["id"]})
    assert done.status_code == 204
    # Without an id, a finished job's stream is just its snapshot.
    only = await read_events(api, path)
    assert [e["event"] for e in only] == ["snapshot"] and only[0]["data"]["status"] == "completed"


async def test_streams_are_scoped_to_the_callers_project(stack: Stack, redis: Redis) -> None:
    api_a, api_b = client(stack, KEY_A), client(stack, KEY_B)
    job_a = await submit(api_a, slow_job(12, prompt="project a"))

    missing = await api_b.get(f"/api/jobs/{job_a}/events")
    assert missing.status_code == 404 and missing.json()["detail"] == "No such job in this project."
    assert (await api_b.get(f"/api/jobs/{job_a}/events", params={"last_event_id": "0-0"})).status_code == 404

    job_b = await submit(api_b, slow_job(8, prompt="project b"))
    events = await read_events(
        api_b,
        "/api/events",
        until=lambda e: e["data"].get("job_id") == job_b and e["data"].get("status") in FINAL,
    )
    snapshot, live = events[0], events[1:]
    assert snapshot["event"] == "snapshot" and snapshot["data"]["project"] == PROJECT_B
    assert [j["job_id"] for j in snapshot["data"]["jobs"]] == [job_b]
    assert live and all(e["data"]["project"] == PROJECT_B and e["data"]["job_id"] == job_b for e in live)
    assert live[-1]["data"]["status"] == "completed"
    # Not vacuous: project A's job did change while B was listening.
    window = await redis.xrange(keys.EVENTS_STREAM, min=f"({snapshot['id']}", max=live[-1]["id"])
    assert any(f["job_id"] == job_a for _, f in window)


async def hmget_calls(redis: Redis) -> int:
    return int((await redis.info("commandstats")).get("cmdstat_hmget", {}).get("calls", 0))


async def test_the_project_snapshot_reads_unfinished_work_not_the_whole_history(stack: Stack, redis: Redis) -> None:
    api = client(stack, KEY_D)
    assert (await api.post("/api/queue/pause")).status_code == 200  # its job stays queued
    job_id = await submit(api, slow_job(4, prompt="queued before a long history"))
    history = keys.project_jobs(PROJECT_D)
    created = await redis.zscore(history, job_id)
    assert created is not None
    # Months of finished jobs after it, as far as the project's index of jobs goes (the snapshot
    # reads each job it considers with one HMGET: these are what an unbounded one would read).
    old = {f"finished-{n}": created + 1 + n for n in range(20_000)}
    await redis.zadd(history, old)
    try:
        before = await hmget_calls(redis)
        snapshot = (await read_events(api, "/api/events", stop_after=1))[0]
        read = await hmget_calls(redis) - before
        assert snapshot["event"] == "snapshot" and snapshot["data"]["project"] == PROJECT_D
        # The queued job is found through the project's queue, not its place in the history.
        assert [(j["job_id"], j["status"]) for j in snapshot["data"]["jobs"]] == [(job_id, "queued")]
        assert read < 3000, f"the snapshot read {read} jobs"
    finally:
        await redis.zrem(history, *old)
        assert (await api.post(f"/api/jobs/{job_id}/cancel")).status_code == 200
        assert (await api.post("/api/queue/resume")).status_code == 200


async def test_idle_streams_get_keepalive_comments_and_bad_ids_are_refused(stack: Stack) -> None:
    api = client(stack, KEY_C)  # a project with no jobs: nothing but pings
    comments = []
    started = time.monotonic()
    async with asyncio.timeout(10), api.stream("GET", "/api/events") as response:
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        async for event in sse(response):
            if "comment" in event:
                comments.append(event["comment"])
                if len(comments) == 2:
                    break
    assert comments == ["ping", "ping"] and time.monotonic() - started < 5

    bad = await api.get("/api/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]
    async with httpx.AsyncClient(base_url=stack.gateway_url) as anonymous:
        assert (await anonymous.get("/api/events")).status_code == 401


async def test_open_streams_do_not_hold_up_gateway_shutdown(stack: Stack) -> None:
    api = client(stack, KEY_C)
    gateway = stack.processes["gateway-0"]
    try:
        async with asyncio.timeout(20), api.stream("GET", "/api/events") as response:
            events = sse(response)
            assert (await anext(events))["event"] == "snapshot"
            started = time.monotonic()
            await asyncio.to_thread(gateway.stop)
            took = time.monotonic() - started
            rest = [e async for e in events if "comment" not in e]
        assert rest == []
        assert took < 5, f"the gateway took {took:.1f}s to stop with an open event stream"
    finally:
        stack.start_service("gateway")
