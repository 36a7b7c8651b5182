"""Gemini refusing every call the same way, on the real stack: a daily quota spent, a key that is
not valid. The first run that meets it holds the whole queue (no RunPod run starts), with its
reason in /api/queue/stats; nothing of the job is failed or lost, and it goes on once the hold ends.
The hold ends by the operator's command here (a daily-quota hold also ends by itself at midnight
Pacific time: tests/test_upstream_hold.py)."""

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.processes import base_env
from deploy.stack import EMULATOR_KEY, Stack
from shared.stores.upstream import UpstreamStore, next_quota_reset
from tests.faults.helpers import assert_job_whole, fault_stack, submit_job, wait_for
from tests.stack_helpers import emulator

pytestmark = pytest.mark.timeout(150)

# One run at a time: "one run's worth of attempts" is then exactly one Gemini call.
ONE_AT_A_TIME = {"BUNCH_MAX_CONCURRENCY": "1", "BUNCH_RUNPOD_HEALTH_INTERVAL_SECONDS": "0.5"}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fault_stack("bunch-upstream-", service_env=ONE_AT_A_TIME, runpod_workers=2) as stack:
        yield stack


@pytest.fixture(autouse=True)
async def clean(stack: Stack, redis: Redis) -> AsyncIterator[None]:
    await emulator(stack, "gemini", "POST", "/_emulator/reset")
    yield
    await UpstreamStore(redis).release()  # what a failed test left held must not hold the next


async def queue_stats(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/api/queue/stats")
    assert response.status_code == 200, response.text
    return dict(response.json())


def operator(stack: Stack, *command: str) -> str:
    """`python -m services.dispatcher.hold ...` with the services' settings, as an operator runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "services.dispatcher.hold", *command],
        env=base_env(stack.service_env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_spent_daily_quota_holds_the_queue_after_one_call_and_loses_nothing(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"daily_quota_images": 8})
    job_id = await submit_job(api, images=24)

    async def held() -> dict[str, Any] | None:
        return (await queue_stats(api)).get("upstream_hold")

    hold = await wait_for(held, within=60, what="the queue held")
    assert hold["reason"] == "quota_exhausted" and "PerDay" in hold["detail"], hold
    ends = datetime.fromisoformat(hold["until"].replace("Z", "+00:00")).timestamp()
    assert abs(ends - next_quota_reset(time.time())) < 5, hold  # midnight in Pacific time
    # Held: no run starts for a while, and the images of the run that met the quota were not failed.
    runs_at_hold = (await emulator(stack, "runpod", "GET", "/_emulator/stats"))["runs_received"]
    await asyncio.sleep(1.5)  # a window in which nothing may start
    assert (await emulator(stack, "runpod", "GET", "/_emulator/stats"))["runs_received"] == runs_at_hold
    status = (await api.get(f"/api/jobs/{job_id}")).json()
    assert status["status"] == "processing" and status["progress"]["images_succeeded"] == 8, status
    assert status["progress"]["images_failed"] == 0, status
    gemini = await emulator(stack, "gemini", "GET", "/_emulator/stats")
    # One run's worth: its four images' first calls went out together; none was retried.
    assert gemini["by_error"] == {"quota_day": 4} and gemini["calls"] == 8 + 4, gemini
    # The console's figures from RunPod's /health come along.
    runpod = (await queue_stats(api))["runpod"]
    assert runpod is not None and runpod["workers_idle"] + runpod["workers_running"] >= 1, runpod

    # Midnight in Pacific time, early: the quota is back (and large enough for the rest of the
    # job), and the operator releases the hold.
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"daily_quota_images": 100})
    await emulator(stack, "gemini", "POST", "/_emulator/quota/reset")
    assert "quota_exhausted" in operator(stack, "show")
    assert "released" in operator(stack, "release")
    await assert_job_whole(stack, api, redis, job_id, images=24, within=60, claims_may_be_lost=True)
    assert (await queue_stats(api))["upstream_hold"] is None


async def test_an_invalid_gemini_key_holds_the_queue_until_an_operator_releases_it(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    # The workers' key is revoked in Google's console.
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"revoked_keys": [EMULATOR_KEY]})
    job_id = await submit_job(api, images=16)

    async def held() -> dict[str, Any] | None:
        return (await queue_stats(api)).get("upstream_hold")

    hold = await wait_for(held, within=60, what="the queue held")
    assert hold["reason"] == "auth_failed" and "API_KEY_INVALID" in hold["detail"], hold
    assert hold["until"] is None, hold
    await asyncio.sleep(1.5)  # a window in which nothing may start
    gemini = await emulator(stack, "gemini", "GET", "/_emulator/stats")
    assert gemini["calls"] == 4 and set(gemini["by_status"]) == {"400"}, gemini  # one run's worth
    status = (await api.get(f"/api/jobs/{job_id}")).json()
    assert status["progress"]["images_failed"] == 0 and status["status"] == "processing", status

    # A new key is in place (here: the old one valid again); the operator releases the hold.
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"revoked_keys": []})
    assert "released" in operator(stack, "release")
    await assert_job_whole(stack, api, redis, job_id, images=16, within=60, claims_may_be_lost=True)
