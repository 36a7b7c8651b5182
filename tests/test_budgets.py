"""Budgets per project against a real redis-server: spend recorded by complete_run.lua, the pause
when it reaches the budget, the resume at the period's end (the dispatcher's loop, its clock given)
and by an operator. Also the parsing of BUNCH_PROJECT_BUDGETS and the UTC periods."""

import time
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from services.dispatcher.budgets import BudgetResumer
from shared import keys
from shared.budgets import Budget, parse_budgets, period_end, period_id, period_start
from shared.models import ImageStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.budgets import BudgetStore
from shared.stores.jobs import JobStore
from shared.stores.projects import ProjectStore
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore

PROJECT = "pa"
# A run of 4 images of 1,290 output tokens and 1 prompt token each, 2 s on RunPod, at the default
# prices: 4 x (0.3 + 38,700) micro-USD of Gemini + 2 s x $0.00019 = 154,801 + 380 micro-USD.
RUN_MICROS = 154_801 + 380


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_budgets_parse_and_refuse_what_is_not_a_budget() -> None:
    assert parse_budgets(" pa:100/day, team:b:1000.5/month ,") == {
        "pa": Budget(100.0, "day"),
        "team:b": Budget(1000.5, "month"),
    }
    assert parse_budgets("") == {}
    for bad in ("pa:100", "pa:100/week", "pa:-1/day", "pa:0/day", ":5/day", "pa:x/day"):
        with pytest.raises(ValueError, match="project budget"):
            parse_budgets(bad)
    with pytest.raises(ValueError, match="project budget"):
        Settings(project_budgets="pa:100/year")
    assert Budget(0.2, "day").limit_micros == 200_000


def test_periods_are_utc_days_and_calendar_months() -> None:
    now = ts("2024-02-29T23:59:59")
    assert period_start("day", now) == ts("2024-02-29T00:00:00")
    assert period_end("day", now) == ts("2024-03-01T00:00:00")
    assert period_start("month", now) == ts("2024-02-01T00:00:00")
    assert period_end("month", now) == ts("2024-03-01T00:00:00")
    assert period_end("month", ts("2026-12-31T12:00:00")) == ts("2027-01-01T00:00:00")
    assert period_id("day", now) == "day:2024-02-29" and period_id("month", now) == "month:2024-02"
    # The boundary belongs to the next period.
    assert period_id("day", ts("2024-03-01T00:00:00")) == "day:2024-03-01"


def job(images: int = 4) -> SemiAutoJobRequest:
    return SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=images)


def images(run: ClaimedRun, count: int = 4) -> dict[int, ImageRecord]:
    first = int(run.run_id.rsplit(".", 1)[1]) * count
    return {
        first + i: ImageRecord(
            status=ImageStatus.SUCCEEDED,
            attempt=run.attempt,
            object_key=f"k{i}",
            prompt_tokens=1,
            output_tokens=1290,
            finished_at=time.time(),
        )
        for i in range(count)
    }


class World:
    """The stores of one project with a budget, on a database of its own."""

    def __init__(self, redis: Redis, settings: Settings, budgets: str = f"{PROJECT}:0.2/day") -> None:
        self.settings = settings.model_copy(update={"project_budgets": budgets, "max_concurrency": 10})
        self.redis = redis
        self.store = JobStore(redis, self.settings)
        self.runs = RunStore(redis, self.settings)
        self.projects = ProjectStore(redis)
        self.budgets = BudgetStore(redis)

    async def start(self) -> ClaimedRun:
        claims = await self.runs.acquire_many(time.time(), time.time() + 30, 1)
        assert len(claims.runs) == 1, "a run of the project should have started"
        return claims.runs[0]

    async def finish(self, run: ClaimedRun) -> bool:
        completion = Completion(run.run_id, run.attempt, run.claim, RunStatus.SUCCEEDED, images(run), runpod_ms=2000)
        return await self.runs.complete(completion)

    async def spent(self, now: float) -> int:
        return int(await self.redis.get(keys.project_spend_in(PROJECT, period_id("day", now))) or 0)


async def test_reaching_the_budget_pauses_the_project_until_the_period_ends(
    fresh_redis: Redis, settings: Settings
) -> None:
    world = World(fresh_redis, settings)
    await world.budgets.set_limits(world.settings.budget_by_project())
    for _ in range(3):
        await world.store.create(PROJECT, job())
    first, second = await world.start(), await world.start()
    assert await world.finish(first)
    assert await world.spent(time.time()) == RUN_MICROS  # below 0.2 USD: still running
    assert not (await world.projects.state(PROJECT)).paused
    before = time.time()
    assert await world.finish(second)
    after = time.time()
    assert await world.spent(after) == 2 * RUN_MICROS

    state = await world.projects.state(PROJECT)
    assert state.paused and state.pause_reason == "budget"
    assert state.budget_paused_until in {period_end("day", before), period_end("day", after)}
    assert await fresh_redis.zscore(keys.READY, PROJECT) is None  # out of fair share's ready set
    # The third job is queued, but no run of the project starts.
    assert (await world.runs.acquire_many(time.time(), time.time() + 30, 4)).runs == []

    resumer = BudgetResumer(world.budgets)
    assert state.budget_paused_until is not None
    assert await resumer.pass_once(state.budget_paused_until - 1) == []
    assert (await world.projects.state(PROJECT)).paused
    # Midnight UTC has passed: the project resumes by itself and its queued job starts.
    assert await resumer.pass_once(state.budget_paused_until + 1) == [PROJECT]
    resumed = await world.projects.state(PROJECT)
    assert not resumed.paused and resumed.pause_reason is None
    assert await fresh_redis.zcard(keys.BUDGET_PAUSES) == 0
    third = await world.start()
    assert third.run_id.endswith(".0") and third.run_id not in {first.run_id, second.run_id}


async def test_an_operator_resume_ends_the_pause_for_budget_and_is_not_undone(
    fresh_redis: Redis, settings: Settings
) -> None:
    world = World(fresh_redis, settings, budgets=f"{PROJECT}:0.1/month")
    await world.budgets.set_limits(world.settings.budget_by_project())
    for _ in range(3):
        await world.store.create(PROJECT, job())
    first, second = await world.start(), await world.start()
    assert await world.finish(first)  # 0.155 USD >= 0.1: paused for budget, until next month
    state = await world.projects.state(PROJECT)
    assert state.pause_reason == "budget" and state.budget_paused_until == period_end("month", time.time())

    await world.store.set_paused(PROJECT, False)  # the operator lets it go on
    assert await fresh_redis.zscore(keys.BUDGET_PAUSES, PROJECT) is None
    assert not (await world.projects.state(PROJECT)).paused
    # Only crossing the budget pauses: the run still in flight ends without pausing it again.
    assert await world.finish(second)
    assert not (await world.projects.state(PROJECT)).paused
    third = await world.start()

    # An operator's own pause is never ended by the budget loop, whatever the clock says.
    await world.store.set_paused(PROJECT, True)
    assert await BudgetResumer(world.budgets).pass_once(time.time() + 400 * 86400) == []
    state = await world.projects.state(PROJECT)
    assert state.paused and state.pause_reason == "operator" and state.budget_paused_until is None
    assert await world.finish(third)


async def test_spend_is_kept_per_day_and_month_and_expires_after_its_period(
    fresh_redis: Redis, settings: Settings
) -> None:
    world = World(fresh_redis, settings, budgets="")  # no budget: counted, never paused
    await world.budgets.set_limits(world.settings.budget_by_project())
    assert not await fresh_redis.exists(keys.BUDGETS)
    for _ in range(3):
        await world.store.create(PROJECT, job())
    for _ in range(3):
        assert await world.finish(await world.start())
    now = time.time()
    day = keys.project_spend_in(PROJECT, period_id("day", now))
    month = keys.project_spend_in(PROJECT, period_id("month", now))
    assert int(await fresh_redis.get(day)) == int(await fresh_redis.get(month)) == 3 * RUN_MICROS
    assert not (await world.projects.state(PROJECT)).paused
    # Kept a day past the period's end, then gone.
    assert await fresh_redis.expiretime(day) == int(period_end("day", now)) + 86400
    assert await fresh_redis.expiretime(month) == int(period_end("month", now)) + 86400
    standing = await world.budgets.standing(PROJECT, Budget(1.0, "month"), now)
    assert standing.spent_micros == 3 * RUN_MICROS and standing.remaining_micros == 1_000_000 - 3 * RUN_MICROS


async def test_the_loop_resumes_many_projects_in_batches_and_only_those_due(
    fresh_redis: Redis, settings: Settings
) -> None:
    store = JobStore(fresh_redis, settings)
    budgets = BudgetStore(fresh_redis)
    due = [f"due{n}" for n in range(250)]
    async with fresh_redis.pipeline(transaction=False) as pipe:
        for project in due:
            pipe.set(keys.project_paused(project), "1")
            pipe.zadd(keys.BUDGET_PAUSES, {project: 1000.0})
        pipe.set(keys.project_paused("later"), "1")
        pipe.zadd(keys.BUDGET_PAUSES, {"later": 5000.0})
        await pipe.execute()
    await store.create("due7", job())  # a project with work is ready to start again
    resumed = await BudgetResumer(budgets).pass_once(2000.0)
    assert sorted(resumed) == sorted(due)
    assert not await fresh_redis.exists(*[keys.project_paused(project) for project in due])
    assert await fresh_redis.zrange(keys.BUDGET_PAUSES, 0, -1) == ["later"]
    assert await fresh_redis.zscore(keys.READY, "due7") is not None
    assert await budgets.paused_until("later") == 5000.0
