"""The batch lane's scheduling scripts on a real Redis: batch-lane jobs never enter the RunPod
queues, batches are claimed per job in order, a project's cap of images in batches holds, a paused
project waits, projects take turns, leases keep two dispatchers off one batch, and cancel, requeue
and redo keep every count in step."""

import json
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from shared import keys
from shared.models import AutomaticJobRequest, ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.batches import BatchStore
from shared.stores.jobs import JobStore
from shared.stores.records import Completion, ImageRecord
from shared.stores.runs import RunStore


def lane_settings(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"batch_run_size": 10, "project_max_batch_images": 25, **changes})


def automatic(inputs: int, variations: int = 1, priority: int = 10) -> AutomaticJobRequest:
    ids = [f"{i:032x}" for i in range(inputs)]
    return AutomaticJobRequest(
        mode="automatic",
        base_prompt="a cat",
        input_ids=ids,
        variations_per_image=variations,
        lane="batch",
        priority=priority,
    )


@pytest.fixture
def tuned(settings: Settings) -> Settings:
    return lane_settings(settings)


async def test_a_batch_job_waits_in_the_batch_queue_not_the_runpod_queue(fresh_redis: Redis, tuned: Settings) -> None:
    jobs = JobStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(25))
    assert job.lane == "batch" and job.runs_total == 3  # 10 + 10 + 5
    assert await fresh_redis.zscore(keys.project_batch_queue("pa"), job.id) is not None
    assert await fresh_redis.zcard(keys.project_queue("pa")) == 0
    assert await fresh_redis.zscore(keys.READY, "pa") is None
    # The RunPod claim finds nothing to start: the global cap is for RunPod runs only.
    claims = await RunStore(fresh_redis, tuned).acquire_many(time.time(), time.time() + 60, 16)
    assert claims.runs == []


async def test_batches_are_claimed_in_order_within_the_cap(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(25))
    claimed = await batches.claim(time.time(), 8)
    # 10 + 10 images fit the cap of 25; the third batch (5) would too: 25.
    assert [run.run_id for run in claimed] == [f"{job.id}.0", f"{job.id}.1", f"{job.id}.2"]
    assert int(await fresh_redis.get(keys.project_batch_images("pa")) or 0) == 25
    assert (await jobs.get(job.id)).status == "processing"  # type: ignore[union-attr]
    record = await fresh_redis.hgetall(keys.run(f"{job.id}.2"))
    assert record["lane"] == "batch" and record["images"] == "5" and record["status"] == "dispatched"
    assert await fresh_redis.zcard(keys.BATCH_IN_FLIGHT) == 3
    assert await fresh_redis.zcard(keys.RUNNING) == 0


async def test_the_project_cap_holds_back_further_batches_until_one_ends(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches, runs = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned), RunStore(fresh_redis, tuned)
    first = await jobs.create("pa", automatic(20))
    second = await jobs.create("pa", automatic(20))
    claimed = await batches.claim(time.time(), 8)
    assert [run.run_id for run in claimed] == [f"{first.id}.0", f"{first.id}.1"]  # 20 of 25; 30 would pass it
    assert await batches.claim(time.time(), 8) == []
    assert await fresh_redis.zscore(keys.BATCH_READY, "pa") is None  # set aside until a batch ends
    done = claimed[0]
    records = {i: ImageRecord(status=ImageStatus.SUCCEEDED, attempt=1, finished_at=time.time()) for i in range(10)}
    assert await runs.complete(Completion(done.run_id, done.attempt, done.claim, RunStatus.SUCCEEDED, records))
    assert int(await fresh_redis.get(keys.project_batch_images("pa")) or 0) == 10
    claimed = await batches.claim(time.time(), 8)
    assert [run.run_id for run in claimed] == [f"{second.id}.0"]


async def test_a_paused_project_submits_nothing_until_resumed(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    await jobs.set_paused("pa", True)
    job = await jobs.create("pa", automatic(5))
    assert await batches.claim(time.time(), 8) == []
    await jobs.set_paused("pa", False)
    assert [run.run_id for run in await batches.claim(time.time(), 8)] == [f"{job.id}.0"]


async def test_projects_take_turns(fresh_redis: Redis, settings: Settings) -> None:
    tuned = lane_settings(settings, project_max_batch_images=0)
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    big = await jobs.create("pa", automatic(100))
    small = await jobs.create("pb", automatic(10))
    claimed = [run.run_id for run in await batches.claim(time.time(), 2)]
    assert sorted(claimed) == sorted([f"{big.id}.0", f"{small.id}.0"])


async def test_semi_automatic_batches_never_span_two_prompts(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches, runs = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned), RunStore(fresh_redis, tuned)
    config = SemiAutoJobRequest(mode="semi_auto", prompts=["a", "b"], images_per_prompt=12, lane="batch")
    job = await jobs.create("pa", config)
    assert job.runs_total == 4  # 10 + 2 per prompt
    claimed = await batches.claim(time.time(), 8)
    sizes = [await fresh_redis.hget(keys.run(run.run_id), "images") for run in claimed]
    assert sizes == ["10", "2", "10", "2"]  # 24 images: within the cap of 25
    assert list(await runs.run_slots(f"{job.id}.1", config)) == [10, 11]


async def test_a_lease_keeps_a_second_dispatcher_off_a_batch(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(5))
    now = time.time()
    await batches.claim(now, 8)
    assert await batches.take_due(now, 10) == [f"{job.id}.0"]
    assert await batches.take_due(now + 1, 10) == []  # leased to the first
    assert await batches.take_due(now + tuned.batch_lease_seconds + 1, 10) == [f"{job.id}.0"]  # its holder died


async def test_marks_only_land_on_the_live_claim(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(5))
    (run,) = await batches.claim(time.time(), 8)
    assert await batches.mark(run, "batch_submitting", run.claim, time.time())
    assert (await batches.get(run.run_id)).submitting  # type: ignore[union-attr]
    stale = run._replace(claim="other")
    assert not await batches.mark(stale, "batch_name", "batches/x", time.time())
    await jobs.cancel(job.id)
    assert not await batches.mark(run, "batch_name", "batches/x", time.time())


async def test_cancel_settles_batches_and_asks_for_their_cancellation(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(40))
    first, second = await batches.claim(time.time(), 8)
    await batches.mark(first, "batch_name", "batches/first", time.time())
    done, stopped = await jobs.cancel(job.id)
    assert done and stopped == "1"  # the named one; the other was not submitted yet
    assert await fresh_redis.zcard(keys.BATCH_IN_FLIGHT) == 0
    assert await fresh_redis.zcard(keys.project_batch_in_flight("pa")) == 0
    assert int(await fresh_redis.get(keys.project_batch_images("pa")) or 0) == 0
    assert await fresh_redis.zcard(keys.project_batch_queue("pa")) == 0
    control = await fresh_redis.xrange(keys.CONTROL_STREAM)
    assert [entry["action"] for _, entry in control] == ["cancel_batches"]
    assert json.loads(control[0][1]["names"]) == ["batches/first"]
    assert await fresh_redis.hget(keys.run(second.run_id), "status") == "canceled"


async def test_a_requeued_batch_waits_in_the_batch_retries(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches, runs = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned), RunStore(fresh_redis, tuned)
    await jobs.create("pa", automatic(5))
    (run,) = await batches.claim(time.time(), 8)
    attempt = await runs.requeue(run.run_id, run.attempt, run.claim, time.time(), new_attempt=True, reason="expired")
    assert attempt == 2
    assert await fresh_redis.zscore(keys.BATCH_RETRY_QUEUE, run.run_id) is not None
    assert await fresh_redis.zcard(keys.RETRY_QUEUE) == 0
    assert int(await fresh_redis.get(keys.project_batch_images("pa")) or 0) == 0
    (again,) = await batches.claim(time.time() + 1, 8)
    assert again.run_id == run.run_id and again.attempt == 2 and again.claim != run.claim
    assert int(await fresh_redis.get(keys.project_batch_images("pa")) or 0) == 5


async def test_a_redo_of_a_batch_job_is_a_batch(fresh_redis: Redis, tuned: Settings) -> None:
    jobs, batches, runs = JobStore(fresh_redis, tuned), BatchStore(fresh_redis, tuned), RunStore(fresh_redis, tuned)
    job = await jobs.create("pa", automatic(5))
    (run,) = await batches.claim(time.time(), 8)
    records = {i: ImageRecord(status=ImageStatus.SUCCEEDED, attempt=1, finished_at=time.time()) for i in range(5)}
    await runs.complete(Completion(run.run_id, run.attempt, run.claim, RunStatus.SUCCEEDED, records))
    assert (await jobs.get(job.id)).status == "packaging"  # type: ignore[union-attr]
    assert await jobs.transition(job.id, JobStatus.PACKAGING, JobStatus.COMPLETED)
    done, _ = await jobs.redo(job.id, [1, 3])
    assert done
    (redo,) = await fresh_redis.zrange(keys.BATCH_RETRY_QUEUE, 0, -1)
    assert await fresh_redis.hget(keys.run(redo), "images") == "2"
    assert await fresh_redis.zcard(keys.RETRY_QUEUE) == 0
    (claimed,) = await batches.claim(time.time() + 1, 8)
    assert claimed.run_id == redo
    assert list(await runs.run_slots(redo, automatic(5))) == [1, 3]
