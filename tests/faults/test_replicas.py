"""Two replicas of every service at once: jobs come out whole and the global cap holds across them;
a replica that dies for good leaves nothing behind that the other does not pick up."""

import asyncio
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from tests.faults.helpers import (
    CAP,
    api_client,
    assert_job_whole,
    fault_stack,
    submit_job,
    wait_runs_done,
)
from tests.stack_helpers import emulator

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fault_stack("bunch-replicas-") as stack:
        stack.start_service("gateway", 1)
        # The second dispatcher gives RunPod the second gateway's address: webhooks reach both.
        stack.start_service("dispatcher", 1, {"BUNCH_PUBLIC_URL": stack.gateway_url_of(1)})
        stack.start_service("packager", 1)
        yield stack


async def test_two_replicas_of_everything_keep_jobs_whole_and_the_cap(stack: Stack, redis: Redis) -> None:
    async with api_client(stack, 0) as first, api_client(stack, 1) as second:
        left = await submit_job(first, prompt="left")
        right = await submit_job(second, prompt="right")
        # Each replica answers for the job the other accepted: no state lives in a gateway.
        await asyncio.gather(assert_job_whole(stack, second, redis, left), assert_job_whole(stack, first, redis, right))
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert 1 < stats["max_in_progress"] <= CAP, stats
    assert stats["runs_received"] == 100 and stats["completed"] == 100, stats
    for replica in ("gateway-1", "dispatcher-1", "packager-1"):
        assert stack.processes[replica].alive
    # Both dispatchers started runs, and webhooks came through both gateways.
    jobs_seen = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    hooks = {job["webhook"].split("/internal", 1)[0] for job in jobs_seen}
    assert hooks == {stack.gateway_url_of(0), stack.gateway_url_of(1)}, hooks


async def test_a_replica_of_each_dies_for_good_and_the_other_carries_on(stack: Stack, redis: Redis) -> None:
    async with api_client(stack, 1) as api:
        job_id = await submit_job(api)
        await wait_runs_done(redis, job_id, 10)
        stack.processes["dispatcher-0"].kill()
        stack.processes["packager-0"].kill()
        await assert_job_whole(stack, api, redis, job_id)
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert stats["max_in_progress"] <= CAP, stats
