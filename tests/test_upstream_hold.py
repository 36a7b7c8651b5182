"""The upstream hold on a real Redis: while it is in place no run starts, in any project; a timed
hold (a daily quota) ends by itself; an operator's hold outlasts any timed one. Plus the settings
that must refuse a worker budget longer than RunPod's executionTimeout, and RunPod's policy bounds."""

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from services.dispatcher.payloads import link_lifetime_seconds, run_limits
from services.dispatcher.runpod_limits import RequestGate
from shared import keys
from shared.lifecycle import EXIT_MISCONFIGURED
from shared.models import SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore, next_quota_reset


def job(images: int) -> SemiAutoJobRequest:
    return SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=images)


async def test_a_hold_stops_every_project_and_a_timed_one_ends_by_itself(
    fresh_redis: Redis, settings: Settings
) -> None:
    store = JobStore(fresh_redis, settings.model_copy(update={"max_concurrency": 100}))
    runs = RunStore(fresh_redis, settings.model_copy(update={"max_concurrency": 100}))
    upstream = UpstreamStore(fresh_redis)
    await store.create("a", job(40))
    await store.create("b", job(40))
    assert await upstream.hold("quota_exhausted", "GenerateRequestsPerDay", until=2000.0, now=1000.0)

    assert (await runs.acquire_many(1500.0, 1530.0, 16)).runs == []
    assert await fresh_redis.zcard(keys.RUNNING) == 0
    held = await upstream.current(now=1500.0)
    assert held is not None and (held.reason, held.since, held.until) == ("quota_exhausted", 1000.0, 2000.0)

    # At its end the next claim lifts it and both projects start again.
    claimed = (await runs.acquire_many(2000.0, 2030.0, 16)).runs
    assert {run_id.split(".")[0] for run_id, _, _ in claimed} == set(
        await fresh_redis.zrange(keys.project_jobs("a"), 0, -1)
    ) | set(await fresh_redis.zrange(keys.project_jobs("b"), 0, -1))
    assert not await fresh_redis.exists(keys.UPSTREAM_HOLD)


async def test_an_operator_hold_outlasts_a_timed_one_until_released(fresh_redis: Redis, settings: Settings) -> None:
    store = JobStore(fresh_redis, settings)
    runs = RunStore(fresh_redis, settings)
    upstream = UpstreamStore(fresh_redis)
    await store.create("a", job(8))
    assert await upstream.hold("auth_failed", "API_KEY_INVALID", until=None, now=1000.0)
    # A daily-quota answer arriving later does not shorten it, nor replace its reason.
    assert not await upstream.hold("quota_exhausted", "PerDay", until=2000.0, now=1100.0)
    assert (await runs.acquire_many(5000.0, 5030.0, 4)).runs == []
    held = await upstream.current(now=5000.0)
    assert held is not None and (held.reason, held.until) == ("auth_failed", None)

    assert await upstream.release()
    assert len((await runs.acquire_many(5001.0, 5031.0, 4)).runs) == 2
    assert not await upstream.release()


async def test_a_later_timed_hold_extends_an_earlier_one(fresh_redis: Redis) -> None:
    upstream = UpstreamStore(fresh_redis)
    assert await upstream.hold("quota_exhausted", "first", until=2000.0, now=1000.0)
    assert not await upstream.hold("quota_exhausted", "earlier end", until=1500.0, now=1100.0)
    assert await upstream.hold("quota_exhausted", "later end", until=3000.0, now=1200.0)
    held = await upstream.current(now=1300.0)
    assert held is not None and (held.detail, held.since, held.until) == ("later end", 1000.0, 3000.0)


def test_daily_quotas_reset_at_midnight_pacific_through_daylight_saving() -> None:
    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    def reset(text: str) -> str:
        return datetime.fromtimestamp(next_quota_reset(at(text)), UTC).isoformat()

    assert reset("2026-01-15T12:00:00") == "2026-01-16T08:00:00+00:00"  # PST, UTC-8
    assert reset("2026-07-15T12:00:00") == "2026-07-16T07:00:00+00:00"  # PDT, UTC-7
    assert reset("2026-01-16T07:59:59") == "2026-01-16T08:00:00+00:00"  # a second before midnight
    assert reset("2026-03-08T07:30:00") == "2026-03-08T08:00:00+00:00"  # still PST at midnight
    assert reset("2026-03-08T12:00:00") == "2026-03-09T07:00:00+00:00"  # the day clocks went forward


def test_a_worker_budget_longer_than_the_execution_timeout_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="more than execution_timeout_seconds"):
        Settings(gemini_max_attempts=6, gemini_timeout_seconds=120)
    with pytest.raises(ValidationError, match="must exceed execution_timeout_seconds"):
        Settings(run_ttl_seconds=600, execution_timeout_seconds=600)
    for bad in ({"execution_timeout_seconds": 4}, {"run_ttl_seconds": 8 * 86400}):
        with pytest.raises(ValidationError):
            Settings(**bad)  # type: ignore[arg-type]
    settings = Settings()
    limits = run_limits(settings)
    worst = limits.gemini_max_attempts * limits.gemini_timeout_seconds
    worst += (limits.gemini_max_attempts - 1) * limits.gemini_backoff_max_seconds
    assert worst < limits.budget_seconds <= settings.execution_timeout_seconds


def test_worker_links_outlive_the_runs_wait_in_runpods_queue() -> None:
    settings = Settings()
    assert link_lifetime_seconds(settings) >= settings.run_ttl_seconds
    longest = Settings(run_ttl_seconds=7 * 86400)
    assert link_lifetime_seconds(longest) == 7 * 86400  # SigV4's limit


async def test_the_request_gate_holds_rate_and_concurrency() -> None:
    gate = RequestGate(per_window=20, concurrency=3, window_seconds=0.5)
    active = peak = 0
    started: list[float] = []

    async def call() -> None:
        nonlocal active, peak
        async with gate.slot():
            started.append(time.monotonic())
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.01)
            active -= 1

    await asyncio.gather(*(call() for _ in range(50)))
    assert peak <= 3
    # No half second holds more than 20 starts: 50 need at least two full windows.
    assert all(sum(1 for t in started if first <= t < first + 0.5) <= 20 for first in started)
    assert started[-1] - started[0] >= 1.0


async def test_the_request_gate_counts_a_slow_request_from_its_answer() -> None:
    """A request slowed on its way reaches RunPod late; RunPod's window counts it from then. The gate
    must too, or the next window's requests meet a 429 (seen under load: 2 of 130 bulk cancels)."""
    gate = RequestGate(per_window=2, concurrency=2, window_seconds=0.5)
    arrived: list[float] = []

    async def call(delay: float) -> None:
        async with gate.slot():
            await asyncio.sleep(delay)  # on its way
            arrived.append(time.monotonic())  # RunPod sees it now
            await asyncio.sleep(0.005)

    await asyncio.gather(call(0.3), call(0.0), *(call(0.0) for _ in range(4)))
    arrived.sort()
    assert all(sum(1 for t in arrived if first <= t < first + 0.5) <= 2 for first in arrived), arrived


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"BUNCH_EXECUTION_TIMEOUT_SECONDS": "4"}, "execution_timeout_seconds"),
        ({"BUNCH_RUN_TTL_SECONDS": str(8 * 86400)}, "run_ttl_seconds"),
        ({"BUNCH_GEMINI_MAX_ATTEMPTS": "6"}, "RunPod would stop the run before its last attempt"),
    ],
)
def test_services_refuse_to_start_with_runpod_settings_that_cannot_work(env: dict[str, str], says: str) -> None:
    for service in ("services.dispatcher", "services.packager"):
        done = subprocess.run(
            [sys.executable, "-m", service],
            env={**os.environ, "BUNCH_REDIS_URL": "redis://127.0.0.1:1/0", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == EXIT_MISCONFIGURED, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr
