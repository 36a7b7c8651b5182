"""The dispatcher at RunPod's edges, against the RunPod emulator (as strict as RunPod: its rate
limits, its refusals) on a real Redis: a bulk cancel stays inside RunPod's /cancel limit and
finishes; /status refusals and a run past its maximum age end the run's attempt instead of
postponing it forever; a refused /run holds the queue and keeps the run for later."""

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from deploy.processes import Process, base_env, free_port, python, scratch_dir, wait_http
from services.dispatcher.configs import ConfigCache
from services.dispatcher.dispatch import Dispatcher
from services.dispatcher.payloads import build_run_input
from services.dispatcher.poller import Poller
from services.dispatcher.runpod_client import RunPodClient
from shared import keys
from shared.models import RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.records import ClaimedRun, StartedRun
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore

API_KEY = "edge-key"
ENDPOINT = "edges"

# RunPod's own bounds, with a worker budget that fits them (shared.settings checks the sum).
SHORT_RUNS = {
    "run_ttl_seconds": 10,
    "execution_timeout_seconds": 5,
    "webhook_grace_seconds": 1.0,
    "gemini_timeout_seconds": 1.0,
    "gemini_max_attempts": 1,
    "worker_transfer_allowance_seconds": 0.0,
    "poll_max_refusals": 3,
}


@pytest.fixture(scope="module")
def runpod_url() -> Iterator[str]:
    """Runs that sleep a minute: they stay in flight while the test looks at them."""
    workdir = scratch_dir("bunch-runpod-edges-")
    port = free_port()
    args = python(
        "-m", "deploy.emulators.runpod", "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
        "--workers", "4", "--sleep-ms", "60000", "--full-sleep-ms", "0",
    )  # fmt: skip
    proc = Process("runpod-edges", args, base_env(), workdir / "runpod.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_emulator/stats", proc)
        yield url
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def http(runpod_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        await admin(session, runpod_url, "reset", {})
        await admin(session, runpod_url, "faults/clear", {})
        yield session


async def admin(http: aiohttp.ClientSession, url: str, path: str, body: Any = None) -> Any:
    async with http.request("GET" if body is None else "POST", f"{url}/_emulator/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def client(http: aiohttp.ClientSession, url: str, key: str = API_KEY, **options: Any) -> RunPodClient:
    return RunPodClient(http, f"{url}/v2", ENDPOINT, key, limit_share=1.0, **options)


def refused(operation: str) -> float:
    return REGISTRY.get_sample_value("bunch_runpod_refused_total", {"operation": operation}) or 0.0


async def started_run(
    redis: Redis, settings: Settings, runpod: RunPodClient, dispatched_at: float
) -> tuple[ClaimedRun, str]:
    """A run claimed at `dispatched_at`, started on RunPod, its id recorded: what the dispatcher
    leaves for the poller."""
    await JobStore(redis, settings).create(
        "p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4)
    )
    runs = RunStore(redis, settings)
    (claimed,) = (await runs.acquire_many(dispatched_at, dispatched_at + 1, 1)).runs
    runpod_id = await runpod.run({"run_id": claimed.run_id})
    recorded = await runs.acquire_many(time.time(), time.time() + 1, 0, [StartedRun(*claimed, runpod_id)])
    assert recorded.recorded == [True]
    return claimed, runpod_id


async def results(redis: Redis) -> list[dict[str, Any]]:
    return [
        {**fields, "body": json.loads(fields["body"])} for _, fields in await redis.xrange(keys.TASK_RESULTS_STREAM)
    ]


async def test_a_bulk_cancel_keeps_to_runpods_cancel_limit_and_finishes(
    http: aiohttp.ClientSession, runpod_url: str, fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    runpod = client(http, runpod_url)
    runpod_ids = await asyncio.gather(*(runpod.run({"n": n}) for n in range(130)))
    dispatcher = Dispatcher(
        RunStore(fresh_redis, settings), ConfigCache(JobStore(fresh_redis, settings)), storage, runpod, settings,
        asyncio.Event(), UpstreamStore(fresh_redis),
    )  # fmt: skip
    began = time.monotonic()
    await dispatcher.cancel_on_runpod(list(runpod_ids))
    took = time.monotonic() - began

    stats = await admin(http, runpod_url, "stats")
    # RunPod allows 100 /cancel per 10 s: the 30 beyond waited for the window, none met a 429.
    assert stats["rate_limited"].get("cancel", 0) == 0, stats
    assert stats["cancel_calls"] == 130 and stats["cancelled"] == 130, stats
    assert took >= 9.5, took


async def test_status_refusals_end_the_attempt_after_a_bounded_number(
    http: aiohttp.ClientSession, runpod_url: str, fresh_redis: Redis, settings: Settings
) -> None:
    settings = settings.model_copy(update=SHORT_RUNS)
    runpod = client(http, runpod_url, attempts=1)
    claimed, _ = await started_run(fresh_redis, settings, runpod, time.time())
    await admin(http, runpod_url, "faults", {"status_http_405": 100})
    poller = Poller(RunStore(fresh_redis, settings), fresh_redis, runpod, settings)
    before = refused("status")

    for _ in range(2):
        await poller.check(claimed.run_id, time.time())
    assert await results(fresh_redis) == []  # refused, asked again later
    await poller.check(claimed.run_id, time.time())
    (result,) = await results(fresh_redis)
    assert (result["run_id"], result["claim"], result["body"]["status"]) == (claimed.run_id, claimed.claim, "EXPIRED")
    assert "RunPod refused /status 3 times" in result["body"]["error"], result
    assert refused("status") - before == 3


@pytest.mark.parametrize("status_fault", [None, "status_http_500"])
async def test_a_run_past_its_maximum_age_is_given_up_and_stopped_on_runpod(
    http: aiohttp.ClientSession, runpod_url: str, fresh_redis: Redis, settings: Settings, status_fault: str | None
) -> None:
    settings = settings.model_copy(update=SHORT_RUNS)
    runpod = client(http, runpod_url, attempts=1)
    # Dispatched 100 s ago; its maximum age is 10 (ttl) + 5 (execution) + 1 (grace) seconds.
    claimed, runpod_id = await started_run(fresh_redis, settings, runpod, time.time() - 100)
    if status_fault:  # RunPod cannot say anything about it
        await admin(http, runpod_url, "faults", {status_fault: 100})
    poller = Poller(RunStore(fresh_redis, settings), fresh_redis, runpod, settings)
    await poller.check(claimed.run_id, time.time())

    (result,) = await results(fresh_redis)
    assert result["body"]["status"] == "EXPIRED", result
    assert "maximum age" in result["body"]["error"], result
    jobs = {job["id"]: job for job in await admin(http, runpod_url, "jobs")}
    assert jobs[runpod_id]["status"] == "CANCELLED", jobs[runpod_id]


async def test_a_refused_run_holds_the_queue_and_keeps_the_run_for_later(
    http: aiohttp.ClientSession, runpod_url: str, fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    store, runs, upstream = JobStore(fresh_redis, settings), RunStore(fresh_redis, settings), UpstreamStore(fresh_redis)
    await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=8))
    rotated = client(http, runpod_url, key="a-rotated-key")  # RunPod answers 401
    dispatcher = Dispatcher(runs, ConfigCache(store), storage, rotated, settings, asyncio.Event(), upstream)
    (claimed,) = (await runs.acquire_many(time.time(), time.time() + 30, 1)).runs
    before = refused("run")

    await dispatcher.start(*claimed)

    hold = await upstream.current()
    assert hold is not None and hold.reason == "runpod_auth_failed" and hold.until is None, hold
    run = await runs.run(claimed.run_id)
    assert run is not None and (run.status, run.attempt) == (RunStatus.QUEUED, claimed.attempt), run
    assert refused("run") - before == 1
    assert (await runs.acquire_many(time.time() + 5, time.time() + 35, 4)).runs == []  # held
    assert await upstream.release()
    again = (await runs.acquire_many(time.time() + 5, time.time() + 35, 4)).runs
    assert (claimed.run_id, claimed.attempt) in [(run.run_id, run.attempt) for run in again]


async def test_an_unreachable_runpod_holds_the_queue_for_a_while_and_keeps_the_run(
    http: aiohttp.ClientSession, fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    """No answer at all (a wrong URL, a network down): not the same attempt retried forever, each
    run on its own, with nothing shown; the queue waits visibly, and starts again by itself."""
    settings = settings.model_copy(update={"retry_backoff_seconds": 2.0, "retry_backoff_max_seconds": 60.0})
    store, runs, upstream = JobStore(fresh_redis, settings), RunStore(fresh_redis, settings), UpstreamStore(fresh_redis)
    await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=8))
    nowhere = client(http, f"http://127.0.0.1:{free_port()}", attempts=1)  # nothing listens there
    dispatcher = Dispatcher(runs, ConfigCache(store), storage, nowhere, settings, asyncio.Event(), upstream)
    (claimed,) = (await runs.acquire_many(time.time(), time.time() + 30, 1)).runs

    await dispatcher.start(*claimed)

    hold = await upstream.current()
    assert hold is not None and hold.reason == "runpod_unreachable", hold
    assert hold.until is not None and 0 < hold.until - time.time() <= 2.0, hold  # retry_backoff_seconds
    run = await runs.run(claimed.run_id)
    assert run is not None and (run.status, run.attempt) == (RunStatus.QUEUED, claimed.attempt), run
    assert (await runs.acquire_many(time.time(), time.time() + 30, 4)).runs == []  # held, for now
    # The hold ends by itself: the run, still on its first attempt, is claimed again.
    later = hold.until + 0.1
    again = (await runs.acquire_many(later, later + 30, 4)).runs
    [retried] = [r for r in again if r.run_id == claimed.run_id]
    assert retried.attempt == claimed.attempt
    for other in again:
        if other is not retried:
            await runs.requeue(other.run_id, other.attempt, other.claim, later, new_attempt=False, reason="test")
    # Still no answer: the next hold lasts twice as long.
    await dispatcher.start(*retried)
    hold = await upstream.current()
    assert hold is not None and hold.until is not None and 2.0 < hold.until - time.time() <= 4.0, hold


async def test_a_runs_links_outlive_its_wait_in_runpods_queue(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    """RunPod keeps a run queued up to its ttl (24 h by default) before a worker opens its links:
    they are signed for that long, not for the 1 h of links handed to people."""
    settings = settings.model_copy(update={"presign_expiry_seconds": 3600, "run_ttl_seconds": 86400})
    store = JobStore(fresh_redis, settings)
    job = await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4))
    run_input = build_run_input(await store.config(job.id), f"{job.id}.0", [0, 1, 2, 3], 1, "c1", storage, settings)
    lifetimes = {parse_qs(urlsplit(item.output_url).query)["X-Amz-Expires"][0] for item in run_input.items}
    assert lifetimes == {str(86400 + 30)}  # ttl + the webhook grace
    assert run_input.limits is not None and run_input.limits.budget_seconds <= settings.execution_timeout_seconds
