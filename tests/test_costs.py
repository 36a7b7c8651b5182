"""What jobs cost: the price table, the cost each recorded run adds (real redis-server), and on the
whole stack (gateway, dispatcher, packager, the RunPod emulator running worker/handler.py, the
Gemini emulator reached by google-genai) the recorded cost of a job against the emulator's token
counts, its quote, every place that shows it, and a project paused by its budget that resumes at
the period's boundary."""

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from deploy.stack import Stack
from services.dispatcher.budgets import BudgetResumer
from shared import keys, planning
from shared.budgets import period_end
from shared.gemini_models import FLASH_IMAGE, PRO_IMAGE
from shared.models import AutomaticJobRequest, ImageStatus, RunStatus, SemiAutoJobRequest
from shared.pricing import estimate_tokens, gemini_micros, output_tokens_per_image, run_cost
from shared.settings import Settings
from shared.stores.budgets import BudgetStore
from shared.stores.jobs import JobStore
from shared.stores.records import Completion, ImageRecord
from shared.stores.runs import RunStore
from tests.stack_helpers import (
    client,
    download_zip,
    emulator,
    png_bytes,
    redis_of,
    running_stack,
    submit,
    upload,
    wait_final,
)
from tests.test_metrics import scrape, value

PRICE_PER_SECOND = 0.00019  # the default: RunPod's 24 GB flex price


# --- the price table ---------------------------------------------------------------------------


def test_default_prices_are_googles_per_image_prices() -> None:
    settings = Settings()
    flash, pro = settings.gemini_prices[FLASH_IMAGE], settings.gemini_prices[PRO_IMAGE]
    # $0.039 an image of 2.5 Flash Image, $0.134 a 1K/2K and $0.24 a 4K image of 3 Pro; batch: half.
    assert gemini_micros(flash.realtime, 0, output_tokens_per_image(FLASH_IMAGE, None)) == 38_700
    assert gemini_micros(flash.batch, 0, 1290) == 19_350
    assert gemini_micros(pro.realtime, 0, output_tokens_per_image(PRO_IMAGE, "2K")) == 134_400
    assert gemini_micros(pro.realtime, 0, output_tokens_per_image(PRO_IMAGE, "4K")) == 240_000
    assert gemini_micros(pro.batch, 1_000_000, 0) == 1_000_000  # input $2 / 1M, batch $1
    cost = run_cost(settings, "realtime", 1000, 1290, runpod_ms=2500)
    assert (cost.gemini_micros, cost.runpod_micros) == (300 + 38_700, 475)
    assert run_cost(settings, "batch", 1000, 1290, runpod_ms=0).micros == 150 + 19_350


def test_a_model_without_prices_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="no prices for gemini_model 'gemini-9-image'"):
        Settings(gemini_model="gemini-9-image")


def test_token_estimates_in_closed_form_equal_the_sum_over_every_image() -> None:
    semi = SemiAutoJobRequest(
        mode="semi_auto",
        prompts=["short", "a much longer prompt text"],
        reference_ids=["a" * 32, "b" * 32, "a" * 32],
        images_per_prompt=5,
    )
    automatic = AutomaticJobRequest(
        mode="automatic", base_prompt="make it blue", input_ids=["c" * 32, "d" * 32], variations_per_image=3
    )
    for config in (semi, automatic):
        whole = estimate_tokens(config, FLASH_IMAGE)
        each = estimate_tokens(config, FLASH_IMAGE, range(planning.images_total(config)))
        assert whole == each
    assert estimate_tokens(semi, FLASH_IMAGE).prompt_tokens == 5 * (5 // 4 + 3 * 258) + 5 * (25 // 4 + 3 * 258)
    assert estimate_tokens(automatic, FLASH_IMAGE).output_tokens == 6 * 1290


# --- what a recorded run adds (real Redis) -----------------------------------------------------------


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_recorded_run_adds_its_cost_to_the_job_the_hour_and_the_counters_once(
    fresh_redis: Redis, settings: Settings
) -> None:
    store, runs = JobStore(fresh_redis, settings), RunStore(fresh_redis, settings)
    created = await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=8))
    first, second = (await runs.acquire_many(time.time(), time.time() + 30, 2)).runs
    now = time.time()
    ok = ImageRecord(
        status=ImageStatus.SUCCEEDED, attempt=1, object_key="k", prompt_tokens=10, output_tokens=1290, finished_at=now
    )
    # A failed image Gemini answered (a safety block) was billed its prompt.
    blocked = ImageRecord(
        status=ImageStatus.FAILED, attempt=1, error="safety_blocked", prompt_tokens=10, finished_at=now
    )
    gemini_before = sample("bunch_cost_usd_total", lane="realtime", kind="gemini")
    runpod_before = sample("bunch_cost_usd_total", lane="realtime", kind="runpod")
    tokens_before = sample("bunch_gemini_tokens_total", lane="realtime", direction="output")
    outcome = Completion(
        first.run_id, 1, first.claim, RunStatus.SUCCEEDED, {0: ok, 1: ok, 2: ok, 3: blocked}, runpod_ms=1500
    )
    assert await runs.complete(outcome)
    assert not await runs.complete(outcome)  # delivered again: refused, counted once

    job = await store.get(created.id)
    assert job is not None
    assert (job.prompt_tokens, job.output_tokens, job.runpod_ms) == (40, 3 * 1290, 1500)
    assert job.gemini_micros == round(40 * 0.3 + 3 * 1290 * 30) == 116_112
    assert job.runpod_micros == round(1.5 * PRICE_PER_SECOND * 1e6) == 285
    assert job.cost() == {
        "lane": "realtime",
        "prompt_tokens": 40,
        "output_tokens": 3870,
        "gemini_usd": 0.116112,
        "runpod_seconds": 1.5,
        "runpod_usd": 0.000285,
        "total_usd": 0.116397,
    }
    hour = int(now // 3600)
    hourly = await fresh_redis.hgetall(keys.project_hourly("p"))
    assert int(hourly[f"{hour}:gemini_micros"]) == 116_112 and int(hourly[f"{hour}:runpod_micros"]) == 285
    assert float(await fresh_redis.hget(keys.RUN_SECONDS, "execution_avg")) == 1.5
    assert sample("bunch_cost_usd_total", lane="realtime", kind="gemini") - gemini_before == pytest.approx(0.116112)
    assert sample("bunch_cost_usd_total", lane="realtime", kind="runpod") - runpod_before == pytest.approx(0.000285)
    assert sample("bunch_gemini_tokens_total", lane="realtime", direction="output") - tokens_before == 3870

    # A batch-lane outcome is priced at the Batch API's half and has no RunPod time; a batch's
    # turnaround does not count as a RunPod run's time.
    run_seconds = await fresh_redis.hgetall(keys.RUN_SECONDS)
    batch = Completion(second.run_id, 1, second.claim, RunStatus.SUCCEEDED, {4: ok}, lane="batch")
    assert await runs.complete(batch)
    job = await store.get(created.id)
    assert job is not None and job.gemini_micros == 116_112 + round((10 * 0.3 + 1290 * 30) / 2)
    assert job.runpod_micros == 285
    assert await fresh_redis.hgetall(keys.RUN_SECONDS) == run_seconds


# --- on the whole stack ------------------------------------------------------------------------------

COST_KEY, CAPPED_KEY = "cost-key", "capped-key"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-costs-",
        api_keys=f"{COST_KEY}:costs,{CAPPED_KEY}:capped",
        service_env={
            "BUNCH_PROJECT_BUDGETS": "capped:0.2/day",
            "BUNCH_PROJECT_MAX_CONCURRENCY": "1",
            "BUNCH_WEBHOOK_GRACE_SECONDS": "3",
            "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
            "BUNCH_RUNPOD_HEALTH_INTERVAL_SECONDS": "0",
        },
    ) as stack:
        yield stack


@pytest.fixture
async def stack_redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as redis:
        yield redis


async def test_a_jobs_recorded_cost_is_the_emulators_tokens_priced_and_its_quote_matches(stack: Stack) -> None:
    api = client(stack, COST_KEY)
    # Each Gemini call takes a while, so RunPod's executionTime is more than a few ms.
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 300})
    refs = await upload(api, [png_bytes(seed=s) for s in (1, 2)])
    prompts = ["a red fox in the snow at dawn", "a lighthouse on a cliff"]
    body = {"mode": "semi_auto", "group": "costs", "prompts": prompts, "reference_ids": refs, "images_per_prompt": 4}
    quote = await api.post("/api/jobs/quote", json=body)
    assert quote.status_code == 200, quote.text
    quoted = quote.json()["lanes"]["realtime"]

    job_id = await submit(api, body)
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed", status
    cost = status["cost"]
    # The emulator's counts (deploy/emulators/gemini/responses.py `usage`): 1 token per 4 characters
    # of the prompt plus 258 per image sent, and 1,290 per image made.
    prompt_tokens = sum(4 * (len(p) // 4 + 2 * 258) for p in prompts)
    assert cost["lane"] == "realtime"
    assert cost["prompt_tokens"] == prompt_tokens and cost["output_tokens"] == 8 * 1290
    exact = (prompt_tokens * 0.30 + 8 * 1290 * 30) / 1e6
    assert abs(cost["gemini_usd"] - exact) <= 2e-6  # rounded to the micro-dollar per run (2 runs)
    assert cost["runpod_seconds"] >= 2 * 0.3  # 2 runs, each at least one Gemini call long
    assert abs(cost["runpod_usd"] - cost["runpod_seconds"] * PRICE_PER_SECOND) <= 2e-6
    assert cost["total_usd"] == round(cost["gemini_usd"] + cost["runpod_usd"], 6)
    # The quote made before anything ran is within 5 % of what was recorded; its tokens exactly.
    assert (quoted["prompt_tokens"], quoted["output_tokens"]) == (cost["prompt_tokens"], cost["output_tokens"])
    assert quoted["gemini_usd"] == cost["gemini_usd"]
    assert abs(quoted["total_usd"] - cost["total_usd"]) <= 0.05 * cost["total_usd"], (quoted, cost)
    # Once runs were observed, RunPod's share is estimated from them: closer still.
    again = (await api.post("/api/jobs/quote", json=body)).json()["lanes"]["realtime"]
    assert abs(again["total_usd"] - cost["total_usd"]) <= 0.01 * cost["total_usd"], (again, cost)

    # Every view of the job shows the same cost.
    assert (await api.get(f"/api/jobs/{job_id}/results")).json()["cost"] == cost
    assert (await api.get(f"/api/jobs/{job_id}")).json()["cost"] == cost
    manifest = json.loads((await download_zip(api, job_id)).read("manifest.json"))
    assert manifest["cost"] == cost
    metrics = (await api.get("/api/queue/metrics")).json()
    assert metrics["cost_usd"] == cost["total_usd"] == metrics["estimated_cost_usd"]
    assert metrics["gemini_cost_usd"] == cost["gemini_usd"] and metrics["runpod_cost_usd"] == cost["runpod_usd"]
    assert sum(h["cost_usd"] for h in metrics["hourly_breakdown"]) == pytest.approx(cost["total_usd"])
    # The dispatcher counts it for Prometheus, by lane and what was paid for.
    samples = await scrape(stack.metrics_url("dispatcher-0"))
    gemini = value(samples, "bunch_cost_usd_total", lane="realtime", kind="gemini")
    assert gemini == pytest.approx(cost["gemini_usd"], abs=2e-6)
    assert value(samples, "bunch_cost_usd_total", lane="realtime", kind="runpod") == pytest.approx(
        cost["runpod_usd"], abs=2e-6
    )
    assert value(samples, "bunch_gemini_tokens_total", lane="realtime", direction="input") == prompt_tokens
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})


async def test_a_project_at_its_budget_pauses_and_resumes_at_the_periods_boundary(
    stack: Stack, stack_redis: Redis
) -> None:
    api = client(stack, CAPPED_KEY)
    four = {"mode": "semi_auto", "prompts": ["budget"], "images_per_prompt": 4}  # one run, ~$0.155
    assert (await api.post("/api/queue/pause")).status_code == 200
    # Each fits the $0.20 left now (queued work is not spend yet); one run at a time in this project.
    first, second, third = [await submit(api, four) for _ in range(3)]
    assert (await api.post("/api/queue/resume")).status_code == 200
    assert (await wait_final(api, first, stack))["status"] == "completed"
    assert (await wait_final(api, second, stack))["status"] == "completed"

    # The second job's run took the spend past $0.20: the project paused itself, with the reason.
    stats = (await api.get("/api/queue/stats")).json()
    dispatcher, budget = stats["dispatcher"], stats["budget"]
    assert dispatcher["paused"] is True and dispatcher["pause_reason"] == "budget", stats
    now = time.time()
    assert dispatcher["paused_until"].replace("Z", "+00:00") in {
        _iso(period_end("day", now)),
        _iso(period_end("day", now - 60)),
    }
    assert budget["limit_usd"] == 0.2 and budget["spent_usd"] >= 0.3 and budget["remaining_usd"] == 0.0
    status = (await api.get(f"/api/jobs/{third}/status")).json()
    assert status["status"] == "queued", status

    # Over the budget, a submit is refused with the figures, and nothing is stored.
    jobs_before = await stack_redis.zcard(keys.project_jobs("capped"))
    counts_before = await stack_redis.hgetall(keys.project_counts("capped"))
    refused = await api.post("/api/jobs", json={**four, "images_per_prompt": 1})
    assert refused.status_code == 402, refused.text
    assert refused.json()["remaining_usd"] == 0.0 and refused.json()["spent_usd"] == budget["spent_usd"]
    assert await stack_redis.zcard(keys.project_jobs("capped")) == jobs_before
    assert await stack_redis.hgetall(keys.project_counts("capped")) == counts_before

    # Midnight UTC, as the dispatcher's loop sees it: the project resumes and its queued job runs.
    until = await BudgetStore(stack_redis).paused_until("capped")
    assert until is not None
    assert await BudgetResumer(BudgetStore(stack_redis)).pass_once(until + 1) == ["capped"]
    assert (await wait_final(api, third, stack))["status"] == "completed"
    stats = (await api.get("/api/queue/stats")).json()
    assert stats["dispatcher"]["paused"] is False and stats["dispatcher"]["pause_reason"] is None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def test_a_batch_quote_has_no_runpod_time_and_half_the_gemini_price(stack: Stack) -> None:
    api = client(stack, COST_KEY)
    quote = (
        await api.post(
            "/api/jobs/quote", json={"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 3, "lane": "batch"}
        )
    ).json()
    batch = quote["lanes"]["batch"]
    assert quote["lane"] == "batch" and quote["budget"] is None and quote["within_budget"] is True
    assert batch["runpod_usd"] == 0.0 and batch["gemini_usd"] == round((3 * 1290 * 15) / 1e6, 6)
    assert batch["runs"] == 1
