"""Fair share and quotas on the real stack: no project can starve another by priority or size, the
operator's weights set the shares, and quota refusals are 429s that change nothing."""

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from shared import keys
from tests.stack_helpers import client, emulator, redis_of, running_stack, submit

CAP = 4
MAX_QUEUED_IMAGES = 5000
JOBS_PER_MINUTE = 6
PROJECTS = ("hog", "victim", "heavy", "light", "quota", "memory")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-fair-",
        api_keys=",".join(f"key-{p}:{p}" for p in PROJECTS),
        runpod_workers=8,
        service_env={
            "BUNCH_MAX_CONCURRENCY": str(CAP),
            "BUNCH_PROJECT_WEIGHTS": "heavy:3",
            "BUNCH_PROJECT_MAX_QUEUED_IMAGES": str(MAX_QUEUED_IMAGES),
            "BUNCH_PROJECT_MAX_JOBS_PER_MINUTE": str(JOBS_PER_MINUTE),
        },
    ) as stack:
        yield stack


def api(stack: Stack, project: str) -> httpx.AsyncClient:
    return client(stack, f"key-{project}")


def semi(prompt: str, images: int, priority: int = 10) -> dict[str, Any]:
    return {"mode": "semi_auto", "prompts": [prompt], "images_per_prompt": images, "priority": priority}


async def received(stack: Stack) -> list[dict[str, Any]]:
    """Every run RunPod received, in the order it received them."""
    runs: list[dict[str, Any]] = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    return sorted(runs, key=lambda run: run["received_at"])


async def wait_for(condition: Any, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_hog_at_top_priority_cannot_starve_a_small_job(stack: Stack) -> None:
    hog, victim = api(stack, "hog"), api(stack, "victim")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 150})
    hog_job = await submit(hog, semi("hog", 4000, priority=0))  # 1,000 runs at the most urgent priority

    async def cap_full() -> bool:
        return sum(1 for run in await received(stack) if run["input"]["job_id"] == hog_job) >= CAP

    await wait_for(cap_full)
    submitted_at = time.time()
    small = await submit(victim, semi("small", 1, priority=1000))  # the least urgent priority there is

    async def small_started() -> bool:
        return any(run["input"]["job_id"] == small for run in await received(stack))

    await wait_for(small_started, within=30)
    runs = await received(stack)
    small_at = next(run["received_at"] for run in runs if run["input"]["job_id"] == small)
    hog_between = [run for run in runs if run["input"]["job_id"] == hog_job and submitted_at < run["received_at"]]
    hog_between = [run for run in hog_between if run["received_at"] < small_at]
    # The first slot that frees goes to the newcomer: at most a claim already on the wire comes first.
    assert len(hog_between) <= 1, f"{len(hog_between)} of the hog's runs started first"
    assert (await hog.post(f"/api/jobs/{hog_job}/cancel")).status_code == 200
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})


async def test_weights_share_the_capacity_three_to_one(stack: Stack) -> None:
    heavy, light = api(stack, "heavy"), api(stack, "light")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 20})
    # The light project asks for the more urgent priority: it changes nothing between projects.
    heavy_job = await submit(heavy, semi("heavy", 1000, priority=50))  # 250 runs each
    light_job = await submit(light, semi("light", 1000, priority=0))
    window = 200

    def of_both(runs: list[dict[str, Any]]) -> list[str]:
        return [run["input"]["job_id"] for run in runs if run["input"]["job_id"] in (heavy_job, light_job)]

    async def enough() -> bool:
        order = of_both(await received(stack))
        return light_job in order and len(order) - order.index(light_job) >= window

    await wait_for(enough, within=120)
    order = of_both(await received(stack))
    both_queued = order[order.index(light_job) :][:window]  # from the moment both had runs waiting
    heavy_runs, light_runs = both_queued.count(heavy_job), both_queued.count(light_job)
    assert 2.7 <= heavy_runs / light_runs <= 3.3, (heavy_runs, light_runs)
    for project, job in ((heavy, heavy_job), (light, light_job)):
        assert (await project.post(f"/api/jobs/{job}/cancel")).status_code == 200
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})


async def test_quota_refusals_are_429s_that_change_nothing(stack: Stack) -> None:
    quota = api(stack, "quota")
    assert (await quota.post("/api/queue/pause")).status_code == 200  # everything stays queued
    try:
        too_big = await quota.post("/api/jobs", json=semi("too big", MAX_QUEUED_IMAGES + 1))
        assert too_big.status_code == 422 and str(MAX_QUEUED_IMAGES) in too_big.json()["detail"]
        first = await submit(quota, semi("first", 4000))
        async with redis_of(stack) as redis:
            before = {
                "jobs": await redis.zcard(keys.project_jobs("quota")),
                "live": await redis.get(keys.project_live_images("quota")),
                "counts": await redis.hgetall(keys.project_counts("quota")),
            }
            over = await quota.post("/api/jobs", json=semi("over", 1001))
            assert over.status_code == 429
            assert int(over.headers["Retry-After"]) >= 1
            assert f"at most {MAX_QUEUED_IMAGES} images queued or running" in over.json()["detail"]
            after = {
                "jobs": await redis.zcard(keys.project_jobs("quota")),
                "live": await redis.get(keys.project_live_images("quota")),
                "counts": await redis.hgetall(keys.project_counts("quota")),
            }
            assert after == before == {"jobs": 1, "live": "4000", "counts": {"queued": "1"}}
            # A canceled job frees its images at once.
            assert (await quota.post(f"/api/jobs/{first}/cancel")).status_code == 200
            assert await redis.get(keys.project_live_images("quota")) == "0"
            # One job already went in this minute; the rest of the minute's burst goes in, then 429.
            for n in range(JOBS_PER_MINUTE - 1):
                await submit(quota, semi(f"burst {n}", 1))
            jobs_before = await redis.zcard(keys.project_jobs("quota"))
            flood = await quota.post("/api/jobs", json=semi("one too many", 1))
            assert flood.status_code == 429, flood.text
            assert f"at most {JOBS_PER_MINUTE} jobs per minute" in flood.json()["detail"]
            assert 1 <= int(flood.headers["Retry-After"]) <= 60 // JOBS_PER_MINUTE
            assert await redis.zcard(keys.project_jobs("quota")) == jobs_before
    finally:
        await quota.post("/api/queue/cancel", json={})
        await quota.post("/api/queue/resume")


async def test_new_jobs_are_refused_while_redis_is_short_of_memory(stack: Stack) -> None:
    memory = api(stack, "memory")
    async with redis_of(stack) as redis, httpx.AsyncClient(base_url=stack.gateway_url) as plain:
        try:
            # At 97 % of a limit set from the memory in use now, past the 90 % refuse fraction. Used
            # memory moves (other jobs of the stack finish and are archived), so the limit is set
            # again until the gateway, reading afresh, sees the pressure just before the request.
            for _ in range(10):
                used = int((await redis.info("memory"))["used_memory"])
                await redis.config_set("maxmemory", str(int(used / 0.97)))
                await asyncio.sleep(1.2)  # the gateway reads Redis's memory at most once a second
                if (await plain.get("/readyz")).json()["redis_memory_pressure"]:
                    break
            jobs_before = await redis.zcard(keys.project_jobs("memory"))
            refused = await memory.post("/api/jobs", json=semi("no room", 1))
            assert refused.status_code == 503, refused.text
            assert "memory limit" in refused.json()["detail"]
            assert await redis.zcard(keys.project_jobs("memory")) == jobs_before
            ready = (await plain.get("/readyz")).json()
            assert ready["status"] == "ready" and ready["redis_memory_pressure"] is True
            assert ready["redis_memory_fraction"] >= 0.9
            assert (await memory.get("/api/jobs")).status_code == 200  # reads go on
        finally:
            await redis.config_set("maxmemory", "0")
        await asyncio.sleep(1.2)
        ready = (await plain.get("/readyz")).json()
        assert ready["redis_memory_pressure"] is False and ready["redis_memory_fraction"] is None
        job = await submit(memory, semi("room again", 1))
        assert (await memory.post(f"/api/jobs/{job}/cancel")).status_code == 200
