"""Redis behind Sentinel loses its primary (SIGKILL) with a 200-image job half done: the Sentinels
promote the replica, every service finds the new primary by itself (no restart), and the job
completes with each image exactly once in its ZIP and no RunPod execution left running. Run twice:
with asynchronous replication, and with every claim and outcome waiting for a replica (WAIT).

Prints the time from the kill to the promotion and to the first run started on the new primary
(the figures docs/architecture.md quotes): `pytest -s tests/faults/test_redis_failover.py`.
"""

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from tests.faults.helpers import assert_job_whole, fault_stack, runpod_jobs, submit_job, wait_runs_done

pytestmark = pytest.mark.timeout(240)

SERVICES = ("gateway-0", "dispatcher-0", "packager-0")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@pytest.fixture(scope="module", params=[0, 1], ids=["async-replication", "wait-for-a-replica"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    env = {"BUNCH_REDIS_WAIT_REPLICAS": str(request.param)}
    with fault_stack(f"bunch-failover-{request.param}-", redis_ha=True, service_env=env) as stack:
        yield stack


async def test_the_primary_killed_mid_job(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    ha = stack.redis_ha
    assert ha is not None
    job_id = await submit_job(api)
    await wait_runs_done(redis, job_id, 25)  # half of its 50 runs

    killed_at = time.time()
    ha.processes["redis"].kill()
    promoted_after = await asyncio.to_thread(ha.wait_primary, ha.replica_port)

    status = await assert_job_whole(stack, api, redis, job_id, within=120, claims_may_be_lost=True)
    assert all(stack.processes[name].alive for name in SERVICES), stack.logs()

    executions = await runpod_jobs(stack, job_id)
    still_running = [j["id"] for j in executions if j["status"] not in FINAL]
    assert not still_running, f"RunPod executions left running: {still_running}"
    assert not [run for run in await redis.zrange(keys.RUNNING, 0, -1) if run.startswith(job_id)]
    first_after = min(j["received_at"] for j in executions if j["received_at"] > killed_at)
    print(
        f"\nfailover ({stack.service_env['BUNCH_REDIS_WAIT_REPLICAS']} replicas waited for): promoted "
        f"{promoted_after:.2f} s after the kill, first run started {first_after - killed_at:.2f} s after it; "
        f"{len(executions)} RunPod executions for {status['progress']['runs_total']} runs"
    )

    # And new work after the failover goes through too.
    later = await submit_job(api, images=8, prompt="after the failover")
    await assert_job_whole(stack, api, redis, later, images=8, claims_may_be_lost=True)
