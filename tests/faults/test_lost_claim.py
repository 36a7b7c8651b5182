"""A claim lost with Redis's last writes (a crash before the AOF sync, a failover before the replica
had it) after RunPod's /run accepted it: the run is claimed again, and RunPod runs it a second time.

Simulated on a real stack: Redis is snapshotted after the job is queued and before its runs are
claimed; the runs are claimed and started; then Redis is killed and started again from the
snapshot, so every claim (and RunPod id) is gone while the executions go on. The lost executions
are made slower than the new ones, so they write their images after the new results were recorded
and checked. Each execution writes the objects of its own claim: the job completes with every
image once, from the executions that count, and nothing of the lost ones reaches the ZIP.
"""

import asyncio
import shutil
import signal
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from shared.settings import Settings
from shared.storage import Storage
from tests.faults.helpers import assert_job_whole, claim_of, fault_stack, runpod_jobs, submit_job, wait_for
from tests.stack_helpers import emulator

pytestmark = pytest.mark.timeout(180)

IMAGES = 16  # 4 runs
LOST_RUN_SECONDS = 6  # how long the executions of the lost claims take: they end last


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # No AOF: a restarted redis-server loads the snapshot it finds, the state from before the claims.
    with fault_stack("bunch-lost-claim-") as stack:
        yield stack


async def gemini_calls(stack: Stack) -> int:
    return int((await emulator(stack, "gemini", "GET", "/_emulator/stats"))["calls"])


async def test_a_run_executed_again_after_its_claim_was_lost_counts_once(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    dispatcher, packager = stack.processes["dispatcher-0"], stack.processes["packager-0"]
    snapshot = stack.workdir / "before-the-claims.rdb"
    calls_before = await gemini_calls(stack)
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": LOST_RUN_SECONDS * 1000})
    # The packager waits until every execution has written its images, lost ones included.
    packager.signal(signal.SIGSTOP)
    dispatcher.signal(signal.SIGSTOP)
    try:
        job_id = await submit_job(api, images=IMAGES)
        await redis.save()
        shutil.copy(stack.workdir / "dump.rdb", snapshot)
    finally:
        dispatcher.signal(signal.SIGCONT)

    async def all_started() -> bool:
        runs = [await redis.hget(keys.run(keys.run_id(job_id, index)), "runpod_id") for index in range(4)]
        return all(runs)

    await wait_for(all_started, within=30, what="the four runs started on RunPod")
    lost = {j["input"]["run_id"]: claim_of(j) for j in await runpod_jobs(stack, job_id)}
    assert len(lost) == 4

    async def calls_made() -> bool:
        return await gemini_calls(stack) >= calls_before + IMAGES

    await wait_for(calls_made, within=30, what="the lost executions calling Gemini")
    await asyncio.sleep(0.3)  # each has read the slow latency
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 30})

    # Redis loses every write since the snapshot: the claims, the RunPod ids.
    stack.processes["redis"].kill()
    shutil.copy(snapshot, stack.workdir / "dump.rdb")
    stack.restart_redis()
    await redis.connection_pool.disconnect()  # the test's own connections died with the server
    # Claimed again at once, maybe; never under the lost claim's name.
    for run_id, claim in lost.items():
        assert await redis.hget(keys.run(run_id), "claim") != claim

    async def recorded() -> bool:
        return await redis.hget(keys.job(job_id), "status") == "packaging"

    await wait_for(recorded, within=60, what="the new executions' results recorded")

    async def lost_ones_done() -> bool:
        executions = await runpod_jobs(stack, job_id)
        return len(executions) == 8 and all(j["status"] == "COMPLETED" for j in executions)

    await wait_for(lost_ones_done, within=60, what="the lost executions finishing")
    counted = {run_id: await redis.hget(keys.run(run_id), "claim") for run_id in lost}
    packager.signal(signal.SIGCONT)

    await assert_job_whole(stack, api, redis, job_id, images=IMAGES, claims_may_be_lost=True)
    executions = await runpod_jobs(stack, job_id)
    for run_id, claim in lost.items():
        claims = {claim_of(j) for j in executions if j["input"]["run_id"] == run_id}
        assert len(claims) == 2 and claim in claims, (run_id, claims)  # run twice, once per claim
        assert counted[run_id] in claims - {claim}, counted  # the result recorded is the new claim's
    # Both executions of each run wrote their images, each under its own claim's names.
    storage = Storage(Settings(s3_endpoint=stack.s3_url))
    listed = await asyncio.to_thread(storage.client.list_objects, storage.bucket, f"jobs/{job_id}/images/")
    stored = [item.object_name for item in listed]
    assert len(stored) == 2 * IMAGES, stored
    assert sum(1 for key in stored if key.endswith(tuple(lost.values()))) == IMAGES
