"""POST /api/jobs/quote and the budget refusal (402) of the routes that create work, on the real
gateway app (in process, with its lifespan) over a real redis-server and moto's S3. Runs that
spend are recorded through the real scripts (RunStore.complete)."""

import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from services.gateway.app import create_app
from shared import keys
from shared.budgets import period_end
from shared.models import ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from shared.stores.records import Completion, ImageRecord
from shared.stores.runs import RunStore
from tests.stack_helpers import png_bytes

BUDGET = "project-a:0.25/day"
OUTPUT_MICROS = 1290 * 30  # one gemini-2.5-flash-image image in the realtime lane


@pytest.fixture
def app_settings(fresh_redis: Redis, settings: Settings) -> Settings:
    # The database fresh_redis empties around each test: what the gateway writes is all there is.
    url = settings.redis_url.rsplit("/", 1)[0] + "/9"
    return settings.model_copy(update={"redis_url": url, "project_budgets": BUDGET, "max_concurrency": 5})


@pytest.fixture
async def api(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer test-key-a"}
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers) as client:
            yield client


async def upload(api: httpx.AsyncClient, count: int, seed: int = 0) -> list[str]:
    files = [("files", (f"i{n}.png", png_bytes(seed=seed + n), "image/png")) for n in range(count)]
    response = await api.post("/api/uploads", files=files)
    assert response.status_code == 201, response.text
    return [u["id"] for u in response.json()["uploads"]]


async def snapshot(redis: Redis) -> dict[str, bytes | None]:
    """Every key and its serialized value: equal snapshots mean nothing was written."""
    raw = Redis(connection_pool=redis.connection_pool, decode_responses=False)
    return {key: await raw.dump(key) for key in sorted(await redis.keys("*"))}


async def test_a_quote_prices_each_lane_from_gemini_token_counts_and_creates_nothing(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    refs = await upload(api, 2)
    prompts = ["a red fox in the snow at dawn", "a lighthouse"]
    body = {"mode": "semi_auto", "prompts": prompts, "reference_ids": refs, "images_per_prompt": 6}
    before = await snapshot(fresh_redis)
    response = await api.post("/api/jobs/quote", json=body)
    assert response.status_code == 200, response.text
    assert await snapshot(fresh_redis) == before
    quote = response.json()
    # What the Gemini emulator (and Gemini) counts per call: 1 token per 4 characters of the prompt
    # and 258 per input image; 1,290 tokens per image out.
    prompt_tokens = sum(6 * (len(p) // 4 + 2 * 258) for p in prompts)
    assert quote["images"] == 12 and quote["model"] == "gemini-2.5-flash-image" and quote["lane"] == "realtime"
    realtime, batch = quote["lanes"]["realtime"], quote["lanes"]["batch"]
    gemini_micros = prompt_tokens * 0.30 + 12 * OUTPUT_MICROS
    assert realtime["prompt_tokens"] == batch["prompt_tokens"] == prompt_tokens
    assert realtime["output_tokens"] == batch["output_tokens"] == 12 * 1290
    assert realtime["gemini_usd"] == round(round(gemini_micros) / 1e6, 6)
    assert batch["gemini_usd"] == round(round(gemini_micros / 2) / 1e6, 6)
    # Runs of at most 4 images, never two prompts in one: 2 x 2. No run observed yet: 20 s each.
    assert realtime["runs"] == 4 and realtime["runpod_worker_seconds"] == 80.0
    assert realtime["runpod_usd"] == round(80 * 0.00019, 6)
    assert realtime["total_usd"] == round(realtime["gemini_usd"] + realtime["runpod_usd"], 6)
    assert realtime["expected_wait_seconds"] == 0.0 and realtime["expected_duration_seconds"] == 20.0  # 4 runs, cap 5
    assert batch["runs"] == 2 and batch["runpod_worker_seconds"] == 0.0 and batch["runpod_usd"] == 0.0
    assert batch["total_usd"] == batch["gemini_usd"]
    assert batch["expected_wait_seconds"] == batch["expected_duration_seconds"] == 3600.0
    budget = quote["budget"]
    assert budget["period"] == "day" and budget["limit_usd"] == 0.25 and budget["spent_usd"] == 0.0
    assert budget["remaining_usd"] == 0.25
    assert budget["resets_at"].replace("Z", "+00:00") == _iso(period_end("day", time.time()))
    assert quote["within_budget"] is False  # 12 images at ~$0.039 each

    automatic = {"mode": "automatic", "base_prompt": "watercolor", "input_ids": refs, "variations_per_image": 3}
    automatic["lane"] = "batch"
    quote = (await api.post("/api/jobs/quote", json=automatic)).json()
    assert quote["images"] == 6 and quote["lane"] == "batch" and quote["within_budget"] is True
    assert quote["lanes"]["batch"]["prompt_tokens"] == 6 * (len("watercolor") // 4 + 258)
    assert quote["lanes"]["realtime"]["runs"] == 2


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def test_the_realtime_wait_comes_from_the_projects_queue(
    api: httpx.AsyncClient, fresh_redis: Redis, app_settings: Settings
) -> None:
    store = JobStore(fresh_redis, app_settings)
    for _ in range(7):  # 7 runs waiting in the project's queue, cap 5
        await store.create("project-a", SemiAutoJobRequest(mode="semi_auto", prompts=["x"], images_per_prompt=4))
    await fresh_redis.hset(keys.RUN_SECONDS, mapping={"avg": 12.0, "execution_avg": 9.0})
    body = {"mode": "semi_auto", "prompts": ["y"], "images_per_prompt": 40}
    realtime = (await api.post("/api/jobs/quote", json=body)).json()["lanes"]["realtime"]
    assert realtime["expected_wait_seconds"] == math.ceil(7 / 5) * 12.0
    assert realtime["expected_duration_seconds"] == math.ceil(10 / 5) * 12.0
    # RunPod bills the execution: 10 runs at the observed 9 s.
    assert realtime["runpod_worker_seconds"] == 90.0
    # A job of a better priority waits behind none of them.
    urgent = (await api.post("/api/jobs/quote", json={**body, "priority": 0})).json()["lanes"]["realtime"]
    assert urgent["expected_wait_seconds"] == 0.0
    # While the project is paused nothing starts: no wait to tell.
    assert (await api.post("/api/queue/pause")).status_code == 200
    paused = (await api.post("/api/jobs/quote", json=body)).json()["lanes"]
    assert paused["realtime"]["expected_wait_seconds"] is None and paused["batch"]["expected_wait_seconds"] is None


@pytest.mark.parametrize(
    "change",
    [
        {"reference_ids": ["0" * 32]},  # an upload that does not exist
        {"params": {"image_size": "2K"}},  # gemini-2.5-flash-image takes no image_size
        {"prompts": []},
        {"surprise": 1},
        {"lane": "overnight"},
    ],
)
async def test_a_quote_refuses_what_a_submit_refuses_with_the_same_answer(
    api: httpx.AsyncClient, change: dict[str, Any]
) -> None:
    body = {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 1, **change}
    quoted, submitted = await api.post("/api/jobs/quote", json=body), await api.post("/api/jobs", json=body)
    assert quoted.status_code == submitted.status_code == 422, (quoted.text, submitted.text)
    assert quoted.json()["detail"] == submitted.json()["detail"]


async def test_a_quote_is_not_a_job_and_needs_a_key(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/jobs/quote")).status_code == 404  # no job is named "quote"
    anonymous = await api.post(
        "/api/jobs/quote",
        json={"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 1},
        headers={"Authorization": "Bearer nobody"},
    )
    assert anonymous.status_code == 401
    missing = {"mode": "automatic", "base_prompt": "x", "dataset_id": "0" * 32}
    assert (await api.post("/api/jobs/quote", json=missing)).status_code == 422
    schema = (await api.get("/openapi.json")).json()
    assert "/api/jobs/quote" in schema["paths"]
    assert "402" in schema["paths"]["/api/jobs"]["post"]["responses"]


async def spend(redis: Redis, settings: Settings, project: str, images: int) -> str:
    """A job of the project whose one run ends recorded (every image succeeded), as the dispatcher
    records a RunPod result: the project's spend grows by the run's cost. Returns the job's id."""
    store, runs = JobStore(redis, settings), RunStore(redis, settings)
    job = await store.create(project, SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=images))
    (run,) = (await runs.acquire_many(time.time(), time.time() + 30, 1)).runs
    records = {
        i: ImageRecord(
            status=ImageStatus.SUCCEEDED, attempt=1, object_key=f"k{i}", output_tokens=1290, finished_at=time.time()
        )
        for i in range(images)
    }
    assert await runs.complete(Completion(run.run_id, run.attempt, run.claim, RunStatus.SUCCEEDED, records))
    return job.id


async def test_over_budget_work_is_refused_with_its_figures_and_changes_nothing(
    api: httpx.AsyncClient, fresh_redis: Redis, app_settings: Settings
) -> None:
    spent_job = await spend(fresh_redis, app_settings, "project-a", 4)  # $0.1548 of $0.25
    store = JobStore(fresh_redis, app_settings)
    assert await store.transition(spent_job, JobStatus.PACKAGING, JobStatus.COMPLETED)
    failed = await store.create("project-a", SemiAutoJobRequest(mode="semi_auto", prompts=["q"], images_per_prompt=4))
    assert await store.transition(failed.id, JobStatus.QUEUED, JobStatus.CANCELED)
    await fresh_redis.delete(keys.project_submissions("project-a"))  # no trace of the setup's bucket

    big = {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 4}
    before = await snapshot(fresh_redis)
    refused = await api.post("/api/jobs", json=big)
    assert refused.status_code == 402, refused.text
    figures = refused.json()
    assert figures["limit_usd"] == 0.25 and figures["spent_usd"] == 0.1548
    assert figures["remaining_usd"] == round(0.25 - 0.1548, 6) and figures["period"] == "day"
    quoted = (await api.post("/api/jobs/quote", json=big)).json()
    assert figures["quote_usd"] == quoted["lanes"]["realtime"]["total_usd"] and not quoted["within_budget"]
    assert figures["resets_at"].endswith("T00:00:00Z") and "budget" in figures["detail"]
    # Half the price fits: the message says so.
    assert 'In the batch lane ("lane": "batch") it would cost about $0.08.' in figures["detail"]
    # Retrying or redoing work over the budget is refused the same way.
    assert (await api.post(f"/api/jobs/{failed.id}/retry")).status_code == 402
    assert (await api.post(f"/api/jobs/{spent_job}/redo", json={"indices": [0, 1, 2, 3]})).status_code == 402
    assert await snapshot(fresh_redis) == before

    # What fits is accepted: one image, and a redo of one.
    small = {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 1}
    assert (await api.post("/api/jobs", json=small)).status_code == 202
    assert (await api.post(f"/api/jobs/{spent_job}/redo", json={"indices": [2]})).status_code == 202


async def test_a_project_without_a_budget_is_quoted_without_one(
    app_settings: Settings, fresh_redis: Redis, api: httpx.AsyncClient
) -> None:
    await spend(fresh_redis, app_settings, "project-b", 4)
    other = httpx.AsyncClient(transport=api._transport, base_url="http://gateway")
    async with other:
        headers = {"Authorization": "Bearer test-key-b"}
        body = {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 400}
        quote = (await other.post("/api/jobs/quote", json=body, headers=headers)).json()
        assert quote["budget"] is None and quote["within_budget"] is True
        assert (await other.post("/api/jobs", json=body, headers=headers)).status_code == 202
