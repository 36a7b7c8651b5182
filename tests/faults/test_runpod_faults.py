"""RunPod misbehaving: 429 and 500 on /run and /status, half the webhooks lost and a third of the
rest delivered twice (late), runs failing, runs stuck IN_PROGRESS until their execution timeout,
and /status answering 404 once a run's results expired. Every job still ends as it should."""

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from tests.faults.helpers import (
    assert_job_whole,
    assert_nothing_pending,
    fault_stack,
    runpod_attempts,
    submit_job,
    wait_for,
)
from tests.stack_helpers import download_zip, emulator, wait_final

pytestmark = pytest.mark.timeout(120)

MAX_ATTEMPTS = 5
EXECUTION_TIMEOUT = 5  # RunPod's least


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    env = {
        "BUNCH_EXECUTION_TIMEOUT_SECONDS": str(EXECUTION_TIMEOUT),
        # A worker budget that fits that timeout (shared.settings refuses one that does not).
        "BUNCH_GEMINI_TIMEOUT_SECONDS": "1",
        "BUNCH_GEMINI_MAX_ATTEMPTS": "2",
        "BUNCH_WORKER_TRANSFER_ALLOWANCE_SECONDS": "2",
        "BUNCH_WEBHOOK_GRACE_SECONDS": "1",
        # Four run-ending faults are injected at once (2 failed, 2 stuck); they may all hit one run,
        # which must still have an attempt left to succeed.
        "BUNCH_MAX_RUN_ATTEMPTS": str(MAX_ATTEMPTS),
    }
    with fault_stack("bunch-runpod-", service_env=env) as stack:
        yield stack


@pytest.fixture(autouse=True)
async def clean(stack: Stack) -> AsyncIterator[None]:
    await emulator(stack, "runpod", "POST", "/_emulator/reset")
    yield
    await emulator(stack, "runpod", "POST", "/_emulator/faults/clear")


async def runpod_jobs(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    jobs = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    return [j for j in jobs if j["input"]["job_id"] == job_id]


async def test_every_fault_at_once(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    faults = {
        "run_http_429": 6,
        "run_http_500": 6,
        "status_http_429": 6,
        "status_http_500": 6,
        "drop_webhooks": 0.5,
        "duplicate_webhooks": 0.3,
        "webhook_delay_ms": 100,  # duplicates and retried webhooks arrive after polled results
        "fail_next_runs": 2,
        "stuck_in_progress": 2,
    }
    await emulator(stack, "runpod", "POST", "/_emulator/faults", faults)
    job_id = await submit_job(api)
    await assert_job_whole(stack, api, redis, job_id, within=100)

    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    left = await emulator(stack, "runpod", "GET", "/_emulator/faults")
    # Every injected fault fired.
    countdowns = ["run_http_429", "run_http_500", "status_http_429", "status_http_500"]
    countdowns += ["fail_next_runs", "stuck_in_progress"]
    assert {name: left[name] for name in countdowns} == dict.fromkeys(countdowns, 0)
    assert stats["failed"] == 2 and stats["webhooks_dropped"] > 0, stats
    jobs = await runpod_jobs(stack, job_id)
    assert all(j["status"] in ("COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED") for j in jobs), jobs
    for j in jobs:
        # A run stuck IN_PROGRESS ends TIMED_OUT at its execution timeout (the policy the dispatcher sent).
        if j["status"] == "TIMED_OUT":
            assert EXECUTION_TIMEOUT <= j["finished_at"] - j["started_at"] < EXECUTION_TIMEOUT + 1, j
    # Each run counts its last attempt, which completed. Any other execution of it ended without
    # output to pay for: it failed, timed out, or was canceled once it could no longer count (a /run
    # retried past the webhook grace is started again as a new attempt by the poller). The job is
    # archived by now: the attempt each image counts is in its ZIP's manifest.
    manifest = json.loads((await download_zip(api, job_id)).read("manifest.json"))
    counted = {keys.run_id(job_id, image["index"] // 4): image["attempt"] for image in manifest["images"]}
    for run_id in {j["input"]["run_id"] for j in jobs}:
        attempt = counted[run_id]
        tried = {j["input"]["attempt"]: j["status"] for j in jobs if j["input"]["run_id"] == run_id}
        assert tried.pop(attempt) == "COMPLETED"
        assert set(tried.values()) <= {"FAILED", "TIMED_OUT", "CANCELLED"}, (run_id, attempt, tried)
        assert all(n < attempt for n in tried), (run_id, attempt, tried)


async def test_expired_results_are_retried(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    # Webhooks lost and /status forgetting finished runs: a finished run looks lost, and is run again.
    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"drop_webhooks": 1.0, "expire_results": True})
    job_id = await submit_job(api, images=8)

    async def second_attempts() -> bool:
        return {a for _, a in await runpod_attempts(stack, job_id)} >= {2}

    await wait_for(second_attempts, within=30, what="runs tried again after their results expired")
    await emulator(stack, "runpod", "POST", "/_emulator/faults/clear")
    await assert_job_whole(stack, api, redis, job_id, images=8)
    jobs = await runpod_jobs(stack, job_id)
    first = [j for j in jobs if j["input"]["attempt"] == 1]
    assert len(first) == 2 and all(j["status"] == "COMPLETED" for j in first)


async def test_results_that_always_expire_fail_the_job_with_the_reason(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"drop_webhooks": 1.0, "expire_results": True})
    job_id = await submit_job(api, images=4)
    status = await wait_final(api, job_id, stack, within=60)
    assert status["status"] == "failed", status
    assert status["error"] == "no image succeeded: 4 run_failed"
    results = (await api.get(f"/api/jobs/{job_id}/results")).json()["images"]
    assert {(i["status"], i["error"]) for i in results} == {("failed", "run_failed")}
    assert all(i["detail"].startswith("EXPIRED") for i in results), results
    # Tried BUNCH_MAX_RUN_ATTEMPTS times, each attempt once.
    assert await runpod_attempts(stack, job_id) == {(f"{job_id}.0", n): 1 for n in range(1, MAX_ATTEMPTS + 1)}
    assert (await api.get(f"/api/jobs/{job_id}/download")).status_code == 409
    await assert_nothing_pending(redis)
