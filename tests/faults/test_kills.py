"""SIGKILL of each service in the middle of a 200-image job, then a restart: the job completes whole.

"Whole": completed with every image, each slot exactly once in the ZIP, no (run, attempt) started
twice on RunPod, and every stream entry acknowledged in the end, those a dead consumer held included.
"""

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from tests.faults.helpers import (
    assert_job_whole,
    fault_stack,
    submit_job,
    wait_for,
    wait_runs_done,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fault_stack("bunch-kills-") as stack:
        yield stack


async def consumer_pending(redis: Redis, stream: str, group: str, consumer: str) -> int:
    for entry in await redis.xinfo_consumers(stream, group):
        if entry["name"] == consumer:
            return int(entry["pending"])
    return 0


async def test_dispatcher_killed_twice_mid_job(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit_job(api)
    await wait_runs_done(redis, job_id, 8)
    stack.processes["dispatcher-0"].kill()
    await asyncio.sleep(1.0)  # webhooks of the runs in flight pile up in the stream meanwhile
    # Restarted under its own name: it first handles what it held when it died.
    stack.start_service("dispatcher", 0)

    await wait_runs_done(redis, job_id, 25)
    stack.processes["dispatcher-0"].kill()
    # What a replica had read when it died: run results taken by a consumer that never comes back.
    held = await redis.xreadgroup(
        keys.DISPATCHER_GROUP, "dispatcher-gone", {keys.TASK_RESULTS_STREAM: ">"}, count=3, block=5000
    )
    assert held and held[0][1], "no run result arrived while the dispatcher was down"
    # A replacement under another name must claim those (XAUTOCLAIM), or the job never ends.
    stack.start_service("dispatcher", 1)
    await assert_job_whole(stack, api, redis, job_id)
    assert await consumer_pending(redis, keys.TASK_RESULTS_STREAM, keys.DISPATCHER_GROUP, "dispatcher-gone") == 0


async def test_packager_killed_while_packaging(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit_job(api)
    packager = stack.processes["packager-0"]
    # Killed holding the job's packaging message, half way through writing its ZIP.
    await wait_for(
        lambda: consumer_pending(redis, keys.PACKAGING_STREAM, keys.PACKAGER_GROUP, "packager-0"),
        within=60,
        every=0.005,
        what="the packager taking the job",
    )
    packager.kill()
    assert (await redis.hget(keys.job(job_id), "status")) == "packaging"
    stack.start_service("packager", 0)
    await assert_job_whole(stack, api, redis, job_id)


async def test_gateway_killed_mid_job(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit_job(api)
    await wait_runs_done(redis, job_id, 10)
    stack.processes["gateway-0"].kill()
    # RunPod's webhooks fail meanwhile; the dispatcher's /status polling must pick those runs up.
    await asyncio.sleep(2.0)
    assert int(await redis.hget(keys.job(job_id), "runs_done") or 0) < 50
    stack.start_service("gateway", 0)
    await assert_job_whole(stack, api, redis, job_id)
