"""The scheduling scripts against a real redis-server: caps, rate, pause, fairness, key names."""

import asyncio
import math

import pytest
from redis.asyncio import Redis

from shared import keys, scripts
from shared.errors import MissingKeys
from shared.models import ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from shared.stores.records import Completion, ImageRecord, JobRecord, QueueFigures, StartedRun
from shared.stores.runs import RunStore


def store_with(redis: Redis, settings: Settings, **overrides: int) -> JobStore:
    return JobStore(redis, settings.model_copy(update=overrides))


def runs_with(redis: Redis, settings: Settings, **overrides: int) -> RunStore:
    return RunStore(redis, settings.model_copy(update=overrides))


def job(images: int, priority: int = 10) -> SemiAutoJobRequest:
    return SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=images, priority=priority)


async def test_lua_key_names_are_the_ones_shared_keys_builds(fresh_redis: Redis) -> None:
    for name, builder in scripts.KEY_FUNCTIONS.items():
        script = scripts.PRELUDE + f"return {name}(ARGV[1])"
        assert await fresh_redis.eval(script, 0, "x1") == builder("x1"), name
    for name, value in scripts.KEY_NAMES.items():
        assert await fresh_redis.eval(scripts.PRELUDE + f"return {name}", 0) == value


async def test_create_stores_and_publishes_the_job_in_one_step(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings)
    announcements = fresh_redis.pubsub()
    await announcements.subscribe(keys.JOBS_CHANNEL)
    assert (await announcements.get_message(timeout=5))["type"] == "subscribe"  # in effect before the first job
    first = await store.create("p", job(8, priority=3))
    # Text that JSON escapes or Lua could mangle travels unchanged.
    config = SemiAutoJobRequest(
        mode="semi_auto", prompts=['é 🦊 \\ "q" \n\t \x00 end'], images_per_prompt=5, priority=2, group="ü/🦊"
    )
    retry = await store.create("p", config, group_id="g1", retry_of=first.id)
    assert retry.seq == first.seq + 1
    stored = await fresh_redis.hgetall(keys.job(retry.id))
    assert stored.pop("config") == config.model_dump_json()
    assert stored["group"] == "ü/🦊"
    assert stored == {k: str(v) for k, v in retry.model_dump(mode="json").items() if v is not None}
    assert await store.get(retry.id) == retry
    assert await fresh_redis.zscore(keys.project_jobs("p"), retry.id) == retry.created_at
    assert await fresh_redis.zscore(keys.group_jobs("g1"), retry.id) == retry.created_at
    assert await fresh_redis.zcard(keys.group_jobs(first.id)) == 0
    assert await fresh_redis.hget(keys.job(first.id), "retried_by") == retry.id
    assert await fresh_redis.hget(keys.job(first.id), "group_id") is None
    assert await fresh_redis.hgetall(keys.project_counts("p")) == {"queued": "2"}
    queue = await fresh_redis.zrange(keys.project_queue("p"), 0, -1, withscores=True)
    assert queue == [(retry.id, 2 * 2**32 + retry.seq), (first.id, 3 * 2**32 + first.seq)]
    assert await fresh_redis.zrange(keys.READY, 0, -1) == ["p"]
    assert await fresh_redis.hgetall(keys.BACKLOG) == {"p": "1"}
    assert await fresh_redis.get(keys.project_live_images("p")) == "13"
    # Each job is announced to idle dispatchers by its project's name; no stream message carries it.
    heard = [await announcements.get_message(timeout=5) for _ in range(2)]
    assert [(m["channel"], m["data"]) for m in heard] == [(keys.JOBS_CHANNEL, "p")] * 2
    assert await announcements.get_message(timeout=0.1) is None
    assert not await fresh_redis.exists("bunch:jobs")
    await announcements.aclose()


async def test_concurrent_claims_never_exceed_the_global_cap(fresh_redis: Redis, settings: Settings) -> None:
    # Many claimers at once stand for many dispatcher replicas: the Lua claim is the only guard.
    stores = [runs_with(fresh_redis, settings, max_concurrency=4) for _ in range(10)]
    await store_with(fresh_redis, settings).create("p", job(400))
    claims = await asyncio.gather(*(s.acquire_many(1000.0, 1030.0, 1) for s in stores for _ in range(5)))
    assert sum(1 for c in claims if c.runs) == 4
    assert await fresh_redis.zcard(keys.RUNNING) == 4


async def test_project_cap_leaves_room_for_other_projects(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=10, project_max_concurrency=2)
    runs = runs_with(fresh_redis, settings, max_concurrency=10, project_max_concurrency=2)
    big = await store.create("big", job(400))
    small = await store.create("small", job(400))
    claims = [(await runs.acquire_many(1000.0, 1030.0, 1)).runs for _ in range(6)]
    started = [c[0][0].split(".")[0] for c in claims if c]
    assert sorted(started) == sorted([big.id, big.id, small.id, small.id])


async def test_dispatch_rate_is_limited(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=100, dispatch_rpm=60)
    runs = runs_with(fresh_redis, settings, max_concurrency=100, dispatch_rpm=60)
    await store.create("p", job(400))
    burst = [(await runs.acquire_many(1000.0, 1030.0, 1)).runs for _ in range(8)]
    assert sum(1 for c in burst if c) == 5  # five seconds' worth at one a second
    assert (await runs.acquire_many(1000.5, 1030.0, 1)).runs == []
    assert (await runs.acquire_many(1001.2, 1030.0, 1)).runs != []


async def test_paused_project_starts_nothing(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=10)
    runs = runs_with(fresh_redis, settings, max_concurrency=10)
    await store.create("p", job(8))
    await store.set_paused("p", True)
    assert (await runs.acquire_many(1000.0, 1030.0, 1)).runs == []
    await store.create("p", job(8))  # new work does not wake a paused project
    assert (await runs.acquire_many(1000.0, 1030.0, 1)).runs == []
    await store.set_paused("p", False)
    assert (await runs.acquire_many(1000.0, 1030.0, 1)).runs != []


async def test_priority_orders_a_projects_own_jobs_and_projects_take_turns(
    fresh_redis: Redis, settings: Settings
) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=100)
    runs = runs_with(fresh_redis, settings, max_concurrency=100)
    a = await store.create("a", job(40))
    b = await store.create("b", job(40))
    c = await store.create("c", job(40, priority=5))
    urgent = await store.create("a", job(8, priority=0))
    order = []
    for _ in range(12):
        (claim,) = (await runs.acquire_many(1000.0, 1030.0, 1)).runs
        order.append(claim[0].split(".")[0])
    # A lower priority number goes first within its project only: between projects, turns.
    assert [order.count(j) for j in (urgent.id, a.id, b.id, c.id)] == [2, 2, 4, 4]
    assert order[:3] == [urgent.id, b.id, c.id] and order.index(a.id) > order.index(urgent.id, 1)
    for turn in range(0, 12, 3):
        assert {store_id.split(".")[0] for store_id in order[turn : turn + 3]} <= {urgent.id, a.id, b.id, c.id}
        assert len({(await store.get(j)).project for j in order[turn : turn + 3]}) == 3  # type: ignore[union-attr]


async def test_weights_share_runs_in_proportion(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=1000)
    runs = runs_with(fresh_redis, settings, max_concurrency=1000)
    await store.set_weights({"heavy": 3})
    heavy = await store.create("heavy", job(4000, priority=0))
    light = await store.create("light", job(4000, priority=9))
    late = [(await runs.acquire_many(1000.0, 1030.0, 1)).runs for _ in range(200)]
    taken = [claim[0][0].split(".")[0] for claim in late if claim]
    assert (taken.count(heavy.id), taken.count(light.id)) == (150, 50)
    # A project that joins later starts at once and gets no credit for the time it was away.
    newcomer = await store.create("new", job(400))
    nxt = [(await runs.acquire_many(1000.0, 1030.0, 1)).runs[0][0].split(".")[0] for _ in range(50)]
    assert nxt[0] == newcomer.id and 9 <= nxt.count(newcomer.id) <= 11  # its weight: 1 of 3 + 1 + 1


async def reference_queue_figures(store: JobStore, job: JobRecord) -> QueueFigures:
    """The queue figures one read at a time from Python, counting the runs waiting job by job: the
    semantics the script must keep from the counts it keeps."""
    redis = store.redis
    if job.status not in (JobStatus.QUEUED, JobStatus.PROCESSING):
        return QueueFigures(None, None, None)
    queue = keys.project_queue(job.project)
    score = await redis.zscore(queue, job.id)
    avg = await redis.hget(keys.RUN_SECONDS, "avg")
    waiting_to_start = score is not None and job.runs_started == 0
    ahead = await redis.zrangebyscore(queue, "-inf", f"({score}") if waiting_to_start else []
    position = len(ahead) + 1 if job.status == JobStatus.QUEUED and score is not None else None
    if avg is None:
        return QueueFigures(position, None, None)
    runs_ahead = 0
    if waiting_to_start:
        runs_ahead += await redis.zcard(keys.project_running(job.project))
        runs_ahead += await redis.zcard(keys.project_retries(job.project))
        waiting = 0
        for queued in await redis.zrange(queue, 0, -1):
            total, started = await redis.hmget(keys.job(queued), "runs_total", "runs_started")
            waiting += int(total or 0) - int(started or 0)
        runs_ahead += math.floor(len(ahead) * waiting / await redis.zcard(queue) + 0.5)
    weights = {p: float(w) for p, w in (await redis.hgetall(keys.BACKLOG)).items()}
    weight = float(await redis.hget(keys.WEIGHTS, job.project) or 1)
    cap = store.settings.max_concurrency * weight / max(weight, sum(weights.values()))
    if store.settings.project_max_concurrency:
        cap = min(cap, store.settings.project_max_concurrency)
    per_run = float(avg)
    waiting_s = math.ceil(runs_ahead / cap) * per_run
    running_s = math.ceil((job.runs_total - job.runs_done) / cap) * per_run
    return QueueFigures(position, round(waiting_s, 1), round(running_s, 1))


async def test_queue_figures_match_the_reference_across_projects_and_priorities(
    fresh_redis: Redis, settings: Settings
) -> None:
    store = store_with(fresh_redis, settings, max_concurrency=10, project_max_concurrency=4)
    runs = runs_with(fresh_redis, settings, max_concurrency=10, project_max_concurrency=4)
    await store.set_weights({"a": 2})
    created = []
    for n in range(15):
        project = ("a", "b", "c")[n % 3]
        created.append(await store.create(project, job(4 * (n % 4 + 1) * settings.run_size, priority=n // 3 % 3)))
    for _ in range(5):  # some jobs start: in-flight runs, partly started jobs still queued
        assert (await runs.acquire_many(1000.0, 1030.0, 1)).runs != []
    assert (await store.cancel(created[7].id))[0]
    # A partly started job moved behind others, so a job ahead of some has runs_started > 0.
    started = [j for j in await store.get_many([c.id for c in created]) if j.runs_started]
    assert await store.set_priority(started[0].id, 2)

    async def compare() -> list[QueueFigures]:
        figures = []
        for record in await store.get_many([c.id for c in created]):
            expected = await reference_queue_figures(store, record)
            assert await store.queue_figures(record) == expected, record.id
            # The status route's single call: the same record and figures, and only for its project.
            assert await store.status_for_project(record.project, record.id) == (record, expected)
            assert await store.status_for_project("elsewhere", record.id) is None
            figures.append(expected)
        return figures

    without_avg = await compare()
    assert all(f.wait_seconds is None for f in without_avg)
    assert None in {f.position for f in without_avg} and {f.position for f in without_avg} >= {1, 2, 3, 4}
    await fresh_redis.hset(keys.RUN_SECONDS, "avg", 7.5)
    assert len({f.wait_seconds for f in await compare()}) > 3
    assert await store.status_for_project("a", "no-such-job") is None


async def test_create_resolves_a_group_by_name_and_requires_its_uploads(fresh_redis: Redis, settings: Settings) -> None:
    store = store_with(fresh_redis, settings)
    uploads = [keys.upload("p", f"u{n}") for n in range(3)]
    await fresh_redis.mset(dict.fromkeys(uploads[:2], "1"))
    with pytest.raises(MissingKeys) as missing:
        await store.create("p", job(4), group_name="birds", required=uploads)
    assert missing.value.indices == [2]
    # Nothing was written: no group, no job, no sequence number taken.
    assert sorted(await fresh_redis.keys("bunch:*")) == uploads[:2]
    first = await store.create("p", job(4), group_name="birds", required=uploads[:2])
    second = await store.create("p", job(4), group_name="birds")
    other = await store.create("q", job(4), group_name="birds")
    assert first.group_id is not None and second.group_id == first.group_id != other.group_id
    assert await fresh_redis.hgetall(keys.project_groups("p")) == {"birds": first.group_id}
    group = await fresh_redis.hgetall(keys.group(first.group_id))
    assert group == {"id": first.group_id, "name": "birds", "project": "p", "created_at": str(first.created_at)}
    assert await fresh_redis.zrange(keys.group_jobs(first.group_id), 0, -1) == [first.id, second.id]
    assert await store.get(second.id) == second
    ungrouped = await store.create("p", job(4))
    assert ungrouped.group_id is None and await fresh_redis.hget(keys.job(ungrouped.id), "group_id") is None


async def test_a_batch_claim_takes_what_single_claims_would(fresh_redis: Redis, settings: Settings) -> None:
    async def order(limit: int) -> list[str]:
        await fresh_redis.flushdb()
        store = store_with(fresh_redis, settings, max_concurrency=7, dispatch_rpm=60)
        runs = runs_with(fresh_redis, settings, max_concurrency=7, dispatch_rpm=60)
        name = {}
        for project, priority in (("a", 10), ("b", 10), ("c", 5), ("a", 5)):
            name[(await store.create(project, job(12, priority=priority))).id] = f"{project}{priority}"
        taken: list[str] = []
        for now in (1000.0, 1003.0, 1100.0):
            while True:  # as the dispatcher does: claim until a claim comes back short
                batch = (await runs.acquire_many(now, now + 30, limit)).runs
                assert len(batch) <= limit
                taken += [f"{name[run_id.split('.')[0]]}:{run_id.split('.')[1]}" for run_id, _, _ in batch]
                if len(batch) < limit:
                    break
        return taken

    singles, batched = await order(1), await order(4)
    # A burst of 5 at first, 3 more tokens 3 s later, then the cap of 7 binds: 7 claims in all.
    assert len(singles) == 7
    assert batched == singles
    assert singles[:3] == ["a5:0", "b10:0", "c5:0"]  # the projects in turn, each its own priority first


async def test_a_batch_claim_stops_at_the_cap(fresh_redis: Redis, settings: Settings) -> None:
    runs = runs_with(fresh_redis, settings, max_concurrency=6)
    await store_with(fresh_redis, settings).create("p", job(400))
    first = (await runs.acquire_many(1000.0, 1030.0, 4)).runs
    second = (await runs.acquire_many(1000.0, 1030.0, 4)).runs
    assert (len(first), len(second)) == (4, 2)
    assert (await runs.acquire_many(1000.0, 1030.0, 4)).runs == []
    assert await fresh_redis.zcard(keys.RUNNING) == 6
    assert len({run.run_id for run in first + second}) == 6
    assert len({run.claim for run in first + second}) == 6  # every claim has a name of its own


async def test_the_claim_call_records_runpod_ids_of_live_attempts_only(fresh_redis: Redis, settings: Settings) -> None:
    runs = runs_with(fresh_redis, settings, max_concurrency=3)
    await store_with(fresh_redis, settings).create("p", job(400))
    (live, attempt, live_claim), (stale, _, stale_claim), (gone, _, gone_claim) = (
        await runs.acquire_many(1000.0, 1030.0, 3)
    ).runs
    assert await runs.requeue(stale, 1, stale_claim, 1000.0, new_attempt=True, reason="retried meanwhile") == 2
    await fresh_redis.hset(keys.run(gone), "status", "canceled")
    started = [
        StartedRun(live, attempt, live_claim, "rp-live"),
        StartedRun(stale, 1, stale_claim, "rp-stale"),
        StartedRun(gone, 1, gone_claim, "rp-gone"),
    ]
    claims = await runs.acquire_many(1001.0, 1031.0, 4, started)
    assert claims.recorded == [True, False, False]
    assert [run.run_id for run in claims.runs] == [stale]  # the retry, then the cap (3) is full
    new_claim = claims.runs[0].claim
    assert await fresh_redis.hget(keys.run(live), "runpod_id") == "rp-live"
    assert await fresh_redis.hget(keys.run(stale), "runpod_id") == ""
    assert await fresh_redis.hget(keys.run(gone), "runpod_id") == ""
    # An id reported under the right attempt but another claim (one Redis lost) is not recorded.
    lost = StartedRun(stale, 2, "0123456789a", "rp-lost")
    assert (await runs.acquire_many(1002.0, 1032.0, 0, [lost])).recorded == [False]
    assert (await runs.acquire_many(1002.0, 1032.0, 0, [StartedRun(stale, 2, new_claim, "rp-2")])).recorded == [True]
    assert await fresh_redis.hget(keys.run(stale), "runpod_id") == "rp-2"


async def test_a_pass_stores_outcomes_and_claims_in_one_call_even_after_a_script_flush(
    fresh_redis: Redis, settings: Settings
) -> None:
    runs = runs_with(fresh_redis, settings, max_concurrency=2)
    created = await store_with(fresh_redis, settings).create("p", job(12))  # 3 runs
    first, second = (await runs.acquire_many(1000.0, 1030.0, 4)).runs
    await fresh_redis.script_flush()  # as after a Redis restart: the scripts must be loaded again
    image = ImageRecord(status=ImageStatus.SUCCEEDED, attempt=1, object_key="k", bytes=3, finished_at=1001.0)
    outcome = Completion(first.run_id, 1, first.claim, RunStatus.SUCCEEDED, {0: image})
    started = [StartedRun(second.run_id, 1, second.claim, "rp")]
    stored, claims = await runs.settle_and_claim([outcome, outcome], 1001.0, 1031.0, 4, started)
    assert stored == [True, False]  # the same outcome delivered twice is stored once
    assert not isinstance(claims, Exception)
    assert claims.recorded == [True]
    assert [run.run_id for run in claims.runs] == [f"{created.id}.2"]  # the freed slot, refilled
    assert ImageRecord.model_validate_json(await fresh_redis.hget(keys.job_images(created.id), "0")) == image
    assert await fresh_redis.hget(keys.job(created.id), "runs_done") == "1"


async def test_a_run_whose_outcome_beat_its_start_answer_keeps_its_runpod_id(
    fresh_redis: Redis, settings: Settings
) -> None:
    runs = runs_with(fresh_redis, settings, max_concurrency=1)
    await store_with(fresh_redis, settings).create("p", job(4))
    ((run_id, attempt, claim),) = (await runs.acquire_many(1000.0, 1030.0, 4)).runs
    image = ImageRecord(status=ImageStatus.SUCCEEDED, attempt=1, object_key="k", finished_at=1001.0)
    assert await runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, {0: image}))
    # The webhook came (and was stored) before /run's answer reached the dispatcher.
    fast = StartedRun(run_id, attempt, claim, "rp-fast")
    assert (await runs.acquire_many(1002.0, 1032.0, 0, [fast])).recorded == [True]
    assert await fresh_redis.hget(keys.run(run_id), "runpod_id") == "rp-fast"


async def test_live_and_failed_indexes_follow_every_status_change(fresh_redis: Redis, settings: Settings) -> None:
    """Cancel-all and retry-all read these instead of the project's whole history."""
    store = store_with(fresh_redis, settings)
    queued, failing, canceled = [await store.create("p", job(4)) for _ in range(3)]
    live = keys.project_live_jobs("p")
    assert set(await fresh_redis.zrange(live, 0, -1)) == {queued.id, failing.id, canceled.id}
    assert await store.transition(failing.id, JobStatus.QUEUED, JobStatus.PROCESSING)
    assert await store.transition(failing.id, JobStatus.PROCESSING, JobStatus.PACKAGING)
    assert await store.transition(failing.id, JobStatus.PACKAGING, JobStatus.FAILED, error="no image")
    assert (await store.cancel(canceled.id))[0]
    assert await fresh_redis.zrange(live, 0, -1) == [queued.id]
    assert await fresh_redis.zrange(keys.project_failed_jobs("p"), 0, -1) == [failing.id]
    await store.create("p", await store.config(failing.id), retry_of=failing.id)
    assert await fresh_redis.zcard(keys.project_failed_jobs("p")) == 0  # retried: no longer a candidate


async def test_outcomes_and_retries_of_another_claim_change_nothing(fresh_redis: Redis, settings: Settings) -> None:
    """A claim lost with Redis's last writes was made again under another name: what the lost
    execution reports (its outcome, its failure) must not count for the run."""
    runs = runs_with(fresh_redis, settings, max_concurrency=1)
    created = await store_with(fresh_redis, settings).create("p", job(4))
    ((run_id, attempt, claim),) = (await runs.acquire_many(1000.0, 1030.0, 1)).runs
    lost = "0123456789a"
    image = ImageRecord(status=ImageStatus.SUCCEEDED, attempt=1, object_key="k", finished_at=1001.0)
    assert not await runs.complete(Completion(run_id, attempt, lost, RunStatus.SUCCEEDED, {0: image}))
    assert await runs.requeue(run_id, attempt, lost, 1001.0, new_attempt=True, reason="lost one failed") == 0
    assert await fresh_redis.hget(keys.run(run_id), "status") == "dispatched"
    assert await fresh_redis.hlen(keys.job_images(created.id)) == 0
    assert await runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, {0: image}))
