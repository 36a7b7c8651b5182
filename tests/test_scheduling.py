"""Queue control on the real stack: priorities, caps across replicas, fairness, pause, cancel,
retry, redo, stats and metrics."""

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from services.gateway.routes.jobs import MAX_EXAMINED
from shared import keys
from shared.models import SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from tests.stack_helpers import client, download_zip, emulator, redis_of, running_stack, submit, wait_final

CAP = 4
PROJECTS = ("order", "fair-a", "fair-b", "replicas", "cancel", "retry", "redo", "numbers", "listing")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-scheduling-",
        api_keys=",".join(f"key-{p}:{p}" for p in PROJECTS),
        runpod_workers=8,
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={
            "BUNCH_MAX_CONCURRENCY": str(CAP),
            "BUNCH_WEBHOOK_GRACE_SECONDS": "5",
            "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
            "BUNCH_RETRY_BACKOFF_SECONDS": "0.2",
        },
    ) as stack:
        yield stack


@pytest.fixture(autouse=True)
async def calm_emulators(stack: Stack) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    await emulator(stack, "runpod", "POST", "/_emulator/faults/clear")


def api(stack: Stack, project: str) -> httpx.AsyncClient:
    return client(stack, f"key-{project}")


def semi_request(prompt: str) -> SemiAutoJobRequest:
    return SemiAutoJobRequest(mode="semi_auto", prompts=[prompt], images_per_prompt=1)


def semi(prompt: str, images: int, priority: int = 10) -> dict[str, Any]:
    return {"mode": "semi_auto", "prompts": [prompt], "images_per_prompt": images, "priority": priority}


async def started_jobs_in_order(stack: Stack, job_ids: set[str]) -> list[str]:
    """Job ids in the order RunPod received their runs (one entry per run)."""
    received = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    received.sort(key=lambda j: j["received_at"])
    return [j["input"]["job_id"] for j in received if j["input"]["job_id"] in job_ids]


async def test_priorities_order_starts_and_a_priority_change_moves_a_job(stack: Stack) -> None:
    order = api(stack, "order")
    assert (await order.post("/api/queue/pause")).json() == {"paused": True}
    low = await submit(order, semi("p10", 4, priority=10))
    high = await submit(order, semi("p1", 4, priority=1))
    mid = await submit(order, semi("p5", 4, priority=5))
    moved = await submit(order, semi("moved", 4, priority=10))
    status = (await order.get(f"/api/jobs/{mid}/status")).json()
    assert status["status"] == "queued" and status["queue_position"] == 2
    changed = await order.patch(f"/api/jobs/{moved}", json={"priority": 0})
    assert changed.status_code == 200 and changed.json()["priority"] == 0
    assert (await order.patch(f"/api/jobs/{moved}", json={"priority": -1})).status_code == 422
    assert (await order.get(f"/api/jobs/{moved}/status")).json()["queue_position"] == 1
    await asyncio.sleep(0.5)  # paused: nothing may start
    assert await started_jobs_in_order(stack, {low, high, mid, moved}) == []
    await order.post("/api/queue/resume")
    finals = await asyncio.gather(*(wait_final(order, j, stack) for j in (low, high, mid, moved)))
    assert {f["status"] for f in finals} == {"completed"}
    # started_at is set when the dispatcher claims a job's first run: the scheduler's own order.
    by_start = sorted(zip((f["started_at"] for f in finals), (low, high, mid, moved), strict=True))
    assert [job for _, job in by_start] == [moved, high, mid, low]
    done = await order.patch(f"/api/jobs/{low}", json={"priority": 3})
    assert done.status_code == 409 and "no longer" in done.json()["detail"]


async def test_a_small_project_is_not_starved_by_a_large_one(stack: Stack) -> None:
    big, small = api(stack, "fair-a"), api(stack, "fair-b")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 20})
    big_job = await submit(big, semi("big", 800))  # 200 runs
    await asyncio.sleep(0.3)
    small_job = await submit(small, semi("small", 40))  # 10 runs, later, same priority
    assert (await wait_final(small, small_job, stack))["status"] == "completed"
    await big.post(f"/api/jobs/{big_job}/cancel")
    order = await started_jobs_in_order(stack, {big_job, small_job})
    last_small = max(i for i, job in enumerate(order) if job == small_job)
    big_before = sum(1 for job in order[:last_small] if job == big_job)
    assert big_before < 39, f"{big_before} runs of the big job started before the small job's last run"


async def test_two_dispatchers_never_exceed_the_cap(stack: Stack) -> None:
    second = stack.start_service("dispatcher", replica=1)
    try:
        await emulator(stack, "runpod", "POST", "/_emulator/reset")
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 100})
        replicas = api(stack, "replicas")
        jobs = [await submit(replicas, semi(f"r{n}", 12)) for n in range(6)]
        finals = await asyncio.gather(*(wait_final(replicas, j, stack) for j in jobs))
        assert {f["status"] for f in finals} == {"completed"}
        stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
        assert stats["max_in_progress"] == CAP, stats
        assert stats["runs_received"] == 18
    finally:
        second.stop()


async def test_cancel_stops_running_runs_and_keeps_what_succeeded(stack: Stack) -> None:
    cancel = api(stack, "cancel")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 400})
    before = (await emulator(stack, "runpod", "GET", "/_emulator/stats"))["cancel_calls"]
    job = await submit(cancel, semi("cancel me", 80))
    deadline = time.monotonic() + 30
    while (status := (await cancel.get(f"/api/jobs/{job}/status")).json())["progress"]["images_succeeded"] == 0:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    response = await cancel.post(f"/api/jobs/{job}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["runs_stopped"] >= 1
    await asyncio.sleep(1.5)
    status = (await cancel.get(f"/api/jobs/{job}/status")).json()
    assert status["status"] == "canceled"
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert stats["cancel_calls"] > before
    runs_seen = len(await started_jobs_in_order(stack, {job}))
    await asyncio.sleep(1.0)
    assert len(await started_jobs_in_order(stack, {job})) == runs_seen, "runs started after the cancel"
    assert runs_seen < 20

    results = (await cancel.get(f"/api/jobs/{job}/results")).json()
    kept = [image for image in results["images"] if image["status"] == "succeeded"]
    assert kept and len(kept) == status["progress"]["images_succeeded"]
    async with httpx.AsyncClient() as plain:
        assert (await plain.get(kept[0]["url"])).status_code == 200
    deadline = time.monotonic() + 20
    while not (await cancel.get(f"/api/jobs/{job}/status")).json()["zip"]["ready"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    archive = await download_zip(cancel, job)
    assert len([n for n in archive.namelist() if n.endswith(".png")]) == len(kept)
    again = await cancel.post(f"/api/jobs/{job}/cancel")
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]


async def test_retry_and_retry_all_make_new_jobs_for_exactly_the_failed_ones(stack: Stack) -> None:
    retry = api(stack, "retry")
    failed = [await submit(retry, semi(f"[emu:safety] nope {n}", 2)) for n in range(2)]
    fine = await submit(retry, semi("fine", 2))
    for job in [*failed, fine]:
        await wait_final(retry, job, stack)
    assert [(await retry.get(f"/api/jobs/{j}/status")).json()["status"] for j in failed] == ["failed", "failed"]
    refused = await retry.post(f"/api/jobs/{fine}/retry")
    assert refused.status_code == 409 and "completed" in refused.json()["detail"]

    single = await retry.post(f"/api/jobs/{failed[0]}/retry")
    assert single.status_code == 202
    new_job = single.json()["id"]
    detail = (await retry.get(f"/api/jobs/{new_job}")).json()
    assert detail["retry_of"] == failed[0] and detail["config"]["prompts"] == ["[emu:safety] nope 0"]
    assert (await retry.get(f"/api/jobs/{failed[0]}")).json()["retried_by"] == new_job
    await wait_final(retry, new_job, stack)

    everything = await retry.post("/api/queue/retry", json={"retry_all": True})
    assert everything.status_code == 202
    retried = {r["retry_of"] for r in everything.json()["retried"]}
    # failed[0] was retried already (and its retry failed too): that retry is retried, not failed[0] again.
    assert retried == {failed[1], new_job}
    assert (await retry.post("/api/queue/retry", json={})).status_code == 422


async def test_redo_regenerates_only_the_named_images(stack: Stack) -> None:
    redo = api(stack, "redo")
    job = await submit(redo, semi("redo", 6))
    assert (await wait_final(redo, job, stack))["status"] == "completed"
    before = await download_zip(redo, job)
    running = await redo.post(f"/api/jobs/{job}/redo", json={"indices": [1, 4]})
    assert running.status_code == 202, running.text
    assert running.json()["status"] == "processing"
    status = await wait_final(redo, job, stack)
    assert status["status"] == "completed" and status["progress"]["images_succeeded"] == 6
    after = await download_zip(redo, job)
    changed = {n for n in before.namelist() if n.endswith(".png") and before.read(n) != after.read(n)}
    assert changed == {"00001.png", "00004.png"}
    bad = await redo.post(f"/api/jobs/{job}/redo", json={"indices": [99]})
    assert bad.status_code == 422 and "outside" in bad.json()["detail"]


async def test_stats_and_metrics_match_what_was_done(stack: Stack) -> None:
    numbers = api(stack, "numbers")
    completed = await submit(
        numbers, {"mode": "semi_auto", "prompts": ["ok", "[emu:safety] no"], "images_per_prompt": 3}
    )
    failed = await submit(numbers, semi("[emu:safety] never", 2))
    await wait_final(numbers, completed, stack)
    await wait_final(numbers, failed, stack)
    await numbers.post("/api/queue/pause")
    queued = await submit(numbers, semi("waits", 1))
    stats = (await numbers.get("/api/queue/stats")).json()
    assert stats["queue"] == {
        "queued": 1, "processing": 0, "packaging": 0, "completed": 1, "failed": 1, "canceled": 0, "total_jobs": 3,
    }  # fmt: skip
    assert stats["dispatcher"]["paused"] is True and stats["dispatcher"]["max_concurrency"] == CAP
    assert (await numbers.post(f"/api/jobs/{queued}/cancel")).status_code == 200
    await numbers.post("/api/queue/resume")

    metrics = (await numbers.get("/api/queue/metrics", params={"time_range": "24h"})).json()
    assert metrics["images_succeeded"] == 3 and metrics["images_failed"] == 5
    assert metrics["success_rate"] == round(3 / 8, 4)
    assert metrics["jobs_finished"] == 1 and metrics["avg_duration_s"] > 0
    assert metrics["total_tokens"] >= 3 * 1290
    # The recorded cost (tests/test_costs.py checks it exactly): at least the 3 images made.
    assert metrics["cost_usd"] == metrics["estimated_cost_usd"] >= 3 * 1290 * 30 / 1e6
    assert round(metrics["gemini_cost_usd"] + metrics["runpod_cost_usd"], 6) == metrics["cost_usd"]
    assert sum(h["images_succeeded"] for h in metrics["hourly_breakdown"]) == 3
    assert (await numbers.get("/api/queue/metrics", params={"time_range": "1y"})).status_code == 422
    stats = (await numbers.get("/api/queue/stats")).json()
    assert stats["queue"]["canceled"] == 1 and stats["queue"]["queued"] == 0


async def test_a_run_canceled_while_runpod_answers_its_start_is_stopped_there(stack: Stack) -> None:
    cancel = api(stack, "cancel")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 3000})
    # RunPod queues the run at once but answers /run 1.5 s later: the cancel comes in between, while
    # the dispatcher does not know the run's RunPod id yet.
    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"run_answer_delay_ms": 1500})
    job = await submit(cancel, semi("cancel on the wire", 4))
    deadline = time.monotonic() + 10
    while not (runs := [j for j in await emulator(stack, "runpod", "GET", "/_emulator/jobs")
                        if j["input"]["job_id"] == job]):  # fmt: skip
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    response = await cancel.post(f"/api/jobs/{job}/cancel")
    # No run it could name to RunPod yet: the id is still on its way back.
    assert response.status_code == 200 and response.json()["runs_stopped"] == 0, response.text
    while (run := next(j for j in await emulator(stack, "runpod", "GET", "/_emulator/jobs")
                       if j["id"] == runs[0]["id"]))["status"] != "CANCELLED":  # fmt: skip
        # Only the dispatcher can stop it, once /run has answered and its id turns out to be stale.
        assert time.monotonic() < deadline + 5, run
        await asyncio.sleep(0.1)
    assert (await cancel.get(f"/api/jobs/{job}/status")).json()["status"] == "canceled"


async def test_queue_cancel_and_control_routes_stay_in_their_project(stack: Stack) -> None:
    cancel, other = api(stack, "cancel"), api(stack, "numbers")
    await cancel.post("/api/queue/pause")
    try:
        named = [await submit(cancel, semi(f"bulk {n}", 4)) for n in range(3)]
        foreign = await submit(other, semi("not yours", 1))
        for method, path, body in [
            ("PATCH", f"/api/jobs/{named[0]}", {"priority": 1}),
            ("POST", f"/api/jobs/{named[0]}/cancel", None),
            ("POST", f"/api/jobs/{named[0]}/retry", None),
            ("POST", f"/api/jobs/{named[0]}/redo", {"indices": [0]}),
        ]:
            response = await other.request(method, path, json=body)
            assert response.status_code == 404, (path, response.text)
        assert (await other.post("/api/queue/cancel", json={"job_ids": named})).json() == {"canceled_count": 0}
        one = await cancel.post("/api/queue/cancel", json={"job_ids": [named[0], foreign]})
        assert one.json() == {"canceled_count": 1}
        rest = await cancel.post("/api/queue/cancel", json={})
        assert rest.json() == {"canceled_count": 2}
        statuses = [(await cancel.get(f"/api/jobs/{job}/status")).json()["status"] for job in named]
        assert statuses == ["canceled"] * 3
        assert (await other.get(f"/api/jobs/{foreign}/status")).json()["status"] != "canceled"
        listed = (await cancel.get("/api/jobs", params={"status": "canceled", "limit": 2})).json()
        assert len(listed["jobs"]) == 2 and listed["next_cursor"]
        following = (
            await cancel.get("/api/jobs", params={"status": "canceled", "cursor": listed["next_cursor"]})
        ).json()
        seen = [j["id"] for j in listed["jobs"] + following["jobs"]]
        assert len(seen) == len(set(seen)) and set(named) <= set(seen)
        assert all(j["status"] == "canceled" for j in following["jobs"])
    finally:
        await cancel.post("/api/queue/resume")


async def test_eta_separates_waiting_from_running(stack: Stack) -> None:
    order = api(stack, "order")
    # As measured once runs have completed; set, because runs here take a few ms (ETAs are rounded
    # to 0.1 s, and the test would depend on how fast this machine was a moment ago).
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    await redis.hset(keys.RUN_SECONDS, "avg", 20.0)
    await redis.aclose()
    await order.post("/api/queue/pause")
    try:
        first = await submit(order, semi("eta first", 40))  # 10 runs
        second = await submit(order, semi("eta second", 8))  # 2 runs, behind the first
        status = (await order.get(f"/api/jobs/{second}/status")).json()
        assert status["queue_position"] == 2
        assert status["eta_wait_seconds"] > 0 and status["eta_run_seconds"] > 0, status
        assert status["eta_seconds"] == pytest.approx(status["eta_wait_seconds"] + status["eta_run_seconds"], abs=0.2)
        head = (await order.get(f"/api/jobs/{first}/status")).json()
        # The first waits only for runs in flight; it has five times the second's runs to do.
        assert head["eta_wait_seconds"] < status["eta_wait_seconds"]
        assert head["eta_run_seconds"] > status["eta_run_seconds"]
        await order.post("/api/queue/cancel", json={"job_ids": [first, second]})
    finally:
        await order.post("/api/queue/resume")


async def test_a_filtered_listing_looks_at_a_bounded_number_of_jobs_per_request(stack: Stack) -> None:
    listing = api(stack, "listing")
    await listing.post("/api/queue/pause")
    async with redis_of(stack) as redis:
        store = JobStore(redis, Settings(redis_url=stack.redis_url))
        old = await submit(listing, semi("the one canceled", 1))
        assert (await listing.post(f"/api/jobs/{old}/cancel")).status_code == 200
        # A long history after it (the newest come first): more than one request looks at.
        newer = [semi_request(f"newer {n}") for n in range(MAX_EXAMINED + 50)]
        created = await asyncio.gather(*(store.create("listing", config) for config in newer))
        first = (await listing.get("/api/jobs", params={"status": "canceled"})).json()
        assert first["jobs"] == [] and first["next_cursor"]  # bounded: stopped, and says where to go on
        pages = [first]
        while pages[-1]["next_cursor"]:
            params = {"status": "canceled", "cursor": pages[-1]["next_cursor"]}
            pages.append((await listing.get("/api/jobs", params=params)).json())
        assert [job["id"] for page in pages for job in page["jobs"]] == [old]
        for job in created:
            await store.cancel(job.id)
    await listing.post("/api/queue/resume")
