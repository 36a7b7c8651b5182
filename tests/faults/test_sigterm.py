"""SIGTERM to each service while a job is in flight: it finishes or hands back what it holds, exits 0
within a bounded time, and a restarted replica completes the job."""

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.processes import Process
from deploy.stack import Stack
from shared import keys
from tests.faults.helpers import (
    assert_job_whole,
    fault_stack,
    submit_job,
    wait_for,
    wait_runs_done,
)
from tests.stack_helpers import emulator

pytestmark = pytest.mark.timeout(120)

BOUND_SECONDS = 15.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fault_stack("bunch-sigterm-") as stack:
        yield stack


async def terminate(proc: Process) -> tuple[int | None, float]:
    """SIGTERM, then wait for the exit: (exit status, seconds it took)."""
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    status = await asyncio.to_thread(proc.wait, BOUND_SECONDS + 5)
    return status, time.monotonic() - started


async def held(redis: Redis, stream: str, group: str, consumer: str) -> int:
    return sum(int(c["pending"]) for c in await redis.xinfo_consumers(stream, group) if c["name"] == consumer)


async def test_dispatcher_stops_cleanly_mid_job(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit_job(api)
    await wait_runs_done(redis, job_id, 10)
    # Some /run calls are being retried when the signal comes: they are seen through first.
    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"run_http_429": 3})
    status, took = await terminate(stack.processes["dispatcher-0"])
    await emulator(stack, "runpod", "POST", "/_emulator/faults/clear")
    assert status == 0 and took < BOUND_SECONDS, (status, took, stack.processes["dispatcher-0"].log_tail())
    # Nothing half-done: every run it claimed is on RunPod with its id recorded, or back in a queue.
    for run_id in await redis.zrange(keys.RUNNING, 0, -1):
        assert await redis.hget(keys.run(run_id), "runpod_id"), run_id
    for stream in (keys.TASK_RESULTS_STREAM, keys.CONTROL_STREAM):
        assert await held(redis, stream, keys.DISPATCHER_GROUP, "dispatcher-0") == 0
    assert int(await redis.hget(keys.job(job_id), "runs_done") or 0) < 50
    stack.start_service("dispatcher", 0)
    await assert_job_whole(stack, api, redis, job_id)


async def test_packager_stops_cleanly_while_packaging(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit_job(api, images=100)

    async def packaging() -> int:
        return await held(redis, keys.PACKAGING_STREAM, keys.PACKAGER_GROUP, "packager-0")

    await wait_for(packaging, within=60, every=0.005, what="the packager taking the job")
    status, took = await terminate(stack.processes["packager-0"])
    assert status == 0 and took < BOUND_SECONDS, (status, took, stack.processes["packager-0"].log_tail())
    # It finished the ZIP it was writing before it went.
    assert await redis.hget(keys.job(job_id), "status") == "completed"
    assert await packaging() == 0
    stack.start_service("packager", 0)
    await assert_job_whole(stack, api, redis, job_id, images=100)


async def test_gateway_stops_cleanly_mid_job_with_a_live_event_stream(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    job_id = await submit_job(api)
    await wait_runs_done(redis, job_id, 10)
    async with api.stream("GET", f"/api/jobs/{job_id}/events", timeout=30) as events:
        assert events.status_code == 200
        status, took = await terminate(stack.processes["gateway-0"])
        # The event stream is ended for the server to stop; it does not hold the shutdown up.
        with pytest.raises(httpx.HTTPError):
            async for _ in events.aiter_bytes():
                pass
            raise httpx.ReadError("the stream ended")
    assert took < BOUND_SECONDS, (took, stack.processes["gateway-0"].log_tail())
    # uvicorn re-raises the signal once it has shut down cleanly: see the test below.
    assert status in (0, -signal.SIGTERM), status
    stack.start_service("gateway", 0)
    await assert_job_whole(stack, api, redis, job_id)


async def test_gateway_exits_0_on_sigterm(stack: Stack) -> None:
    status, took = await terminate(stack.processes["gateway-0"])
    stack.start_service("gateway", 0)
    assert took < BOUND_SECONDS
    assert status == 0
