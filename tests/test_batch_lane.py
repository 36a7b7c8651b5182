"""The batch lane on the real stack: jobs made through the Gemini emulator's Batch API and Files API
by the dispatcher (google-genai's client), never through RunPod.

A 1,000-image automatic job completes with each image exactly once; a canceled job cancels its
batches on Gemini; a dispatcher killed with batches in flight, or between a batch's creation and
its record, never submits one twice; a batch that expires is submitted again, and one that keeps
expiring fails its images with the reason.
"""

import asyncio
import io
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import EMULATOR_KEY, Stack
from services.dispatcher.batch_lane.gemini import GeminiBatches, client_for
from services.dispatcher.batch_lane.lane import BatchLane, display_name
from services.dispatcher.configs import ConfigCache
from shared import keys
from shared.models import AutomaticJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.batches import BatchStore
from shared.stores.jobs import JobStore
from shared.stores.runs import RunStore
from tests.stack_helpers import client, download_zip, emulator, png_bytes, redis_of, running_stack, submit, wait_final

RUN_SIZE = 250


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-batch-lane-",
        api_keys="key-batch:batch,key-other:other",
        runpod_workers=4,
        service_env={
            "BUNCH_BATCH_RUN_SIZE": str(RUN_SIZE),
            "BUNCH_BATCH_POLL_SECONDS": "0.2",
            "BUNCH_BATCH_POLL_MAX_SECONDS": "0.5",
            "BUNCH_RETRY_BACKOFF_SECONDS": "0.2",
            "BUNCH_BATCH_LEASE_SECONDS": "5",
        },
    ) as stack:
        yield stack


@pytest.fixture(autouse=True)
async def quick_batches(stack: Stack) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/reset")
    await emulator(
        stack, "gemini", "POST", "/_emulator/config", {"batch_pending_seconds": 0.2, "batch_running_seconds": 0.5}
    )


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, "key-batch") as api:
        yield api


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as redis:
        yield redis


async def dataset(api: httpx.AsyncClient, count: int, seed: int) -> str:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(count):
            archive.writestr(f"input-{i:04d}.png", png_bytes(24, 24, seed=seed * 10_000 + i))
    response = await api.post("/api/datasets", files=[("files", ("inputs.zip", out.getvalue(), "application/zip"))])
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def runpod_runs(stack: Stack) -> int:
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    return int(stats["runs_received"])


async def gemini_stats(stack: Stack) -> dict[str, Any]:
    return dict(await emulator(stack, "gemini", "GET", "/_emulator/stats"))


async def images_of(api: httpx.AsyncClient, job_id: str) -> list[dict[str, Any]]:
    images: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "200", **({"cursor": cursor} if cursor else {})}
        response = await api.get(f"/api/jobs/{job_id}/results", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        images += body["images"]
        cursor = body.get("next_cursor")
        if not cursor:
            return images


async def wait_for(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_thousand_image_job_goes_through_gemini_batches_once_each(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    runpod_before = await runpod_runs(stack)
    dataset_id = await dataset(api, 250, seed=1)
    body = {"mode": "automatic", "base_prompt": "a watercolor", "dataset_id": dataset_id}
    quote = await api.post("/api/jobs/quote", json={**body, "variations_per_image": 4, "lane": "batch"})
    assert quote.status_code == 200, quote.text
    quoted = quote.json()["lanes"]["batch"]
    job_id = await submit(api, {**body, "variations_per_image": 4, "lane": "batch"})

    final = await wait_final(api, job_id, stack, within=240)
    assert final["status"] == "completed", final
    assert final["progress"]["images_succeeded"] == 1000 and final["progress"]["images_failed"] == 0
    assert (final["progress"]["runs_done"], final["progress"]["runs_total"]) == (4, 4)  # four Gemini batches of 250
    # Priced at the batch lane's rates from the emulator's token counts, as quoted; no RunPod time.
    cost = final["cost"]
    assert cost["lane"] == "batch" and cost["runpod_seconds"] == 0 and cost["runpod_usd"] == 0
    assert abs(cost["total_usd"] - quoted["total_usd"]) <= 0.05 * quoted["total_usd"], (cost, quoted)
    assert quoted["total_usd"] == pytest.approx(quote.json()["lanes"]["realtime"]["gemini_usd"] / 2, rel=0.01)

    stats = await gemini_stats(stack)
    assert stats["batches_created"] == 4
    assert stats["batch_requests"] == 1000  # each image asked for once
    assert stats["files_uploaded"] == 250 + 4  # each input once, and one request file per batch
    assert await runpod_runs(stack) == runpod_before  # no RunPod time at all

    images = await images_of(api, job_id)
    assert sorted(image["index"] for image in images) == list(range(1000))
    assert all(image["status"] == "succeeded" for image in images)
    archive = await download_zip(api, job_id)
    pictures = [name for name in archive.namelist() if name.endswith(".png")]
    assert len(pictures) == 1000
    # Nothing of the lane is left behind in Redis once the job is done.
    assert await redis.zcard(keys.BATCH_IN_FLIGHT) == 0
    assert int(await redis.get(keys.project_batch_images("batch")) or 0) == 0


async def test_cancel_stops_the_jobs_batches_on_gemini(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"batch_running_seconds": 60})
    dataset_id = await dataset(api, 40, seed=2)
    body = {"mode": "automatic", "base_prompt": "a pencil sketch", "dataset_id": dataset_id}
    job_id = await submit(api, {**body, "variations_per_image": 15, "lane": "batch"})  # 600 images: 3 batches

    async def all_submitted() -> bool:
        return int((await gemini_stats(stack))["batches_created"]) == 3

    await wait_for(all_submitted, 60, "three batches on Gemini")
    response = await api.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.text
    final = await wait_final(api, job_id, stack, within=60)
    assert final["status"] == "canceled"

    async def all_canceled() -> bool:
        states = (await gemini_stats(stack))["batches_by_state"]
        return int(states.get("JOB_STATE_CANCELLED", 0)) == 3

    await wait_for(all_canceled, 30, "Gemini to cancel the three batches")
    assert await redis.zcard(keys.BATCH_IN_FLIGHT) == 0
    assert int(await redis.get(keys.project_batch_images("batch")) or 0) == 0
    assert (await gemini_stats(stack))["batches_created"] == 3  # nothing submitted after the cancel


async def test_a_dispatcher_killed_with_batches_in_flight_submits_none_twice(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"batch_running_seconds": 3})
    dataset_id = await dataset(api, 50, seed=3)
    body = {"mode": "automatic", "base_prompt": "an oil painting", "dataset_id": dataset_id}
    job_id = await submit(api, {**body, "variations_per_image": 10, "lane": "batch"})  # 500 images: 2 batches

    async def both_submitted() -> bool:
        return int((await gemini_stats(stack))["batches_created"]) == 2

    await wait_for(both_submitted, 60, "two batches on Gemini")
    stack.processes["dispatcher-0"].kill()
    await asyncio.sleep(1)
    stack.start_service("dispatcher", 0)

    final = await wait_final(api, job_id, stack, within=120)
    assert final["status"] == "completed" and final["progress"]["images_succeeded"] == 500, final
    stats = await gemini_stats(stack)
    assert stats["batches_created"] == 2 and stats["batch_requests"] == 500


async def test_a_crash_between_creating_a_batch_and_recording_it_never_submits_it_twice(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    """The narrowest window, driven step by step with the lane's own parts: the batch exists on
    Gemini, its name never reached Redis. The next look finds it by the claim's name."""
    # A database of its own on the same Redis: the stack's dispatcher never sees this job, while the
    # same Gemini emulator and object storage serve it.
    own_url = stack.redis_url.rsplit("/", 1)[0] + "/5"
    settings = Settings(
        redis_url=own_url,
        s3_endpoint=stack.service_env["BUNCH_S3_ENDPOINT"],
        gemini_base_url=stack.gemini_url,
        gemini_api_key=EMULATOR_KEY,
        batch_run_size=RUN_SIZE,
    )
    uploads = await api.post("/api/uploads", files=[("files", ("a.png", png_bytes(24, 24, seed=99), "image/png"))])
    upload_id = uploads.json()["uploads"][0]["id"]
    own = Redis.from_url(own_url, decode_responses=True)
    await own.flushdb()
    try:
        await crash_and_look(stack, own, settings, upload_id)
    finally:
        await own.flushdb()
        await own.aclose()


async def crash_and_look(stack: Stack, redis: Redis, settings: Settings, upload_id: str) -> None:
    jobs = JobStore(redis, settings)
    config = AutomaticJobRequest(
        mode="automatic", base_prompt="a crash", input_ids=[upload_id], variations_per_image=3, lane="batch"
    )
    job = await jobs.create("crash", config)
    store = BatchStore(redis, settings)
    lane = BatchLane(
        store, RunStore(redis, settings), ConfigCache(jobs), GeminiBatches(client_for(settings), settings.gemini_model),
        Storage(settings), settings,
    )  # fmt: skip
    (run,) = await store.claim(time.time(), 8)
    # What a dispatcher that died right after Gemini's answer did: marked, built, created; no name.
    await store.mark(run, "batch_submitting", run.claim, time.time())
    config_read = await ConfigCache(jobs).get(job.id)
    made = await lane.inputs.build(job.id, config_read, [0, 1, 2])
    created = await lane.gemini.create(made.src, display_name(run))
    before = int((await gemini_stats(stack))["batches_created"])

    await lane.look(run.run_id)

    assert int((await gemini_stats(stack))["batches_created"]) == before
    assert await redis.hget(keys.run(run.run_id), "batch_name") == created


async def test_an_expired_batch_is_submitted_again_and_one_that_keeps_expiring_fails_per_image(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    inputs = await api.post("/api/uploads", files=[("files", ("a.png", png_bytes(24, 24, seed=7), "image/png"))])
    upload_id = inputs.json()["uploads"][0]["id"]
    once = {"mode": "automatic", "base_prompt": "a sunrise [emu:batch-expirex1]", "input_ids": [upload_id]}
    always = {"mode": "automatic", "base_prompt": "a sunset [emu:batch-expire]", "input_ids": [upload_id]}
    recovered = await submit(api, {**once, "variations_per_image": 3, "lane": "batch"})
    lost = await submit(api, {**always, "variations_per_image": 2, "lane": "batch"})

    final = await wait_final(api, recovered, stack, within=60)
    assert final["status"] == "completed" and final["progress"]["images_succeeded"] == 3, final

    final = await wait_final(api, lost, stack, within=60)
    assert final["status"] == "failed" and final["progress"]["images_failed"] == 2, final
    images = await images_of(api, lost)
    assert {image["error"] for image in images} == {"batch_expired"}
    stats = await gemini_stats(stack)
    # The first expired once and succeeded when submitted again; the second expired at both attempts.
    assert stats["batches_by_state"].get("JOB_STATE_EXPIRED") == 3
    assert stats["batches_by_state"].get("JOB_STATE_SUCCEEDED") == 1


async def test_per_image_failures_keep_their_reasons(stack: Stack, api: httpx.AsyncClient) -> None:
    semi = {
        "mode": "semi_auto",
        "prompts": ["a bridge", "a forbidden thing [emu:safety]"],
        "images_per_prompt": 2,
        "lane": "batch",
    }
    job_id = await submit(api, semi)
    final = await wait_final(api, job_id, stack, within=60)
    assert final["status"] == "completed", final
    assert (final["progress"]["images_succeeded"], final["progress"]["images_failed"]) == (2, 2)
    failed = [image for image in await images_of(api, job_id) if image["status"] == "failed"]
    assert {image["error"] for image in failed} == {"safety_blocked"}
    assert sorted(image["index"] for image in failed) == [2, 3]


async def test_realtime_jobs_keep_their_pace_while_batches_are_in_flight(stack: Stack, api: httpx.AsyncClient) -> None:
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"batch_running_seconds": 60})
    dataset_id = await dataset(api, 50, seed=4)
    body = {"mode": "automatic", "base_prompt": "a mosaic", "dataset_id": dataset_id, "variations_per_image": 10}
    batch_job = await submit(api, {**body, "lane": "batch"})  # 500 images: two batches, held a minute

    async def both_submitted() -> bool:
        return int((await gemini_stats(stack))["batches_created"]) == 2

    await wait_for(both_submitted, 60, "two batches on Gemini")
    began = time.monotonic()
    realtime = await submit(api, {"mode": "semi_auto", "prompts": ["a lighthouse"], "images_per_prompt": 8})
    final = await wait_final(api, realtime, stack, within=60)
    assert final["status"] == "completed" and final["progress"]["images_succeeded"] == 8, final
    assert time.monotonic() - began < 30  # not behind the batches: they hold no RunPod slot
    status = (await api.get(f"/api/jobs/{batch_job}/status")).json()
    assert status["status"] == "processing" and status["lane"] == "batch"
    stats = (await api.get("/api/queue/stats")).json()
    assert stats["batch"]["batches_in_flight"] == 2 and stats["batch"]["images_in_flight"] == 500
    assert stats["dispatcher"]["active_runs"] == 0  # the batches hold no RunPod slot
    assert (await api.post(f"/api/jobs/{batch_job}/cancel")).status_code == 200


async def test_without_a_gemini_key_the_batch_lane_is_refused_at_submit(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    """A dispatcher without BUNCH_GEMINI_API_KEY starts (the realtime lane needs none) and says the
    batch lane is off; the gateway then refuses batch-lane jobs with the reason instead of queueing
    work nothing will run."""
    keyless = stack.start_service("dispatcher", 7, extra_env={"BUNCH_GEMINI_API_KEY": ""})
    try:

        async def said_off() -> bool:
            return await redis.get(keys.BATCH_LANE_STATE) == "off"

        await wait_for(said_off, 30, "the keyless dispatcher to say the batch lane is off")
        before = await redis.zcard(keys.project_jobs("batch"))
        body = {"mode": "semi_auto", "prompts": ["a kite"], "images_per_prompt": 1}
        refused = await api.post("/api/jobs", json={**body, "lane": "batch"})
        assert refused.status_code == 422 and "batch lane is off" in refused.json()["detail"], refused.text
        assert await redis.zcard(keys.project_jobs("batch")) == before  # nothing stored
        final = await wait_final(api, await submit(api, body), stack, within=60)
        assert final["status"] == "completed"  # the realtime lane needs no Gemini key of the dispatcher's
    finally:
        keyless.kill()
        await redis.set(keys.BATCH_LANE_STATE, "on")  # as dispatcher-0 said when it started
