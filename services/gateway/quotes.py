"""What a job would cost and take, in each lane (POST /api/jobs/quote), and the budget check of every
route that creates work (a submit, a retry, a redo): a job whose quote exceeds what the project's
budget has left this period is refused with 402 before anything is stored.

Gemini's part is exact for the tokens the emulator and Gemini's docs count (shared/pricing.py);
RunPod's part is the runs times the observed RunPod execution time of a run (the time RunPod bills),
and the times come from the project's queue now, as a queued job's ETA does (shared/lua/queue_figures.lua).
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from services.gateway.deps import Services
from services.gateway.schemas.jobs import BudgetState, JobQuote, LaneQuote
from shared import planning, pricing
from shared.budgets import Budget, Standing, parse_budgets
from shared.errors import OverBudget
from shared.models import LANES
from shared.planning import JobConfig
from shared.pricing import usd
from shared.settings import Settings
from shared.stores.budgets import BudgetStore
from shared.stores.projects import QuoteFigures
from shared.times import iso, utc


@dataclass(frozen=True, slots=True)
class Estimate:
    runs: int
    tokens: pricing.TokenEstimate
    gemini_micros: int
    worker_seconds: float
    runpod_micros: int
    wait_seconds: float | None
    duration_seconds: float | None

    @property
    def micros(self) -> int:
        return self.gemini_micros + self.runpod_micros

    def view(self) -> LaneQuote:
        return LaneQuote(
            runs=self.runs,
            prompt_tokens=self.tokens.prompt_tokens,
            output_tokens=self.tokens.output_tokens,
            gemini_usd=usd(self.gemini_micros),
            runpod_worker_seconds=round(self.worker_seconds, 3),
            runpod_usd=usd(self.runpod_micros),
            total_usd=usd(self.micros),
            expected_wait_seconds=self.wait_seconds,
            expected_duration_seconds=self.duration_seconds,
        )


def estimate(
    settings: Settings, config: JobConfig, lane: str, figures: QuoteFigures, indices: Sequence[int] | None = None
) -> Estimate:
    """The job (or a redo of `indices`) in `lane`."""
    runs = pricing.runs_for(config, settings.run_size_for(lane), indices)
    tokens = pricing.estimate_tokens(config, settings.gemini_model, indices)
    prices = pricing.lane_prices(settings, lane)
    gemini = pricing.gemini_micros(prices, tokens.prompt_tokens, tokens.output_tokens)
    stopped = figures.paused or figures.held  # nothing starts until that ends: no wait to tell
    if lane == "batch":
        # No RunPod time; results come a batch's turnaround after its submission, which is soon.
        turnaround = round(figures.batch_seconds or settings.batch_expected_seconds, 1)
        return Estimate(runs, tokens, gemini, 0.0, 0, None if stopped else turnaround, turnaround)
    # What RunPod bills is the execution; until one was observed, the run's whole time, then the setting.
    per_run = figures.execution_seconds or figures.run_seconds or settings.expected_run_seconds
    worker_seconds = runs * per_run
    runpod = pricing.runpod_micros(worker_seconds * 1000, settings.runpod_price_per_second_usd)
    # Runs spread over the project's share of the cap, at the observed run time (dispatch to outcome).
    cap = settings.max_concurrency * figures.share
    if settings.project_max_concurrency:
        cap = min(cap, settings.project_max_concurrency)
    wall = figures.run_seconds or settings.expected_run_seconds
    wait = round(math.ceil(figures.runs_ahead / cap) * wall, 1)
    duration = round(math.ceil(runs / cap) * wall, 1)
    return Estimate(runs, tokens, gemini, worker_seconds, runpod, None if stopped else wait, duration)


@lru_cache(maxsize=8)
def _budgets(text: str) -> dict[str, Budget]:
    return parse_budgets(text)


def budget_of(settings: Settings, project: str) -> Budget | None:
    return _budgets(settings.project_budgets).get(project)


async def standing_of(services: Services, project: str, now: float | None = None) -> Standing | None:
    """Where the project stands against its budget now; None: it has none."""
    budget = budget_of(services.settings, project)
    if budget is None:
        return None
    return await BudgetStore(services.redis).standing(project, budget, time.time() if now is None else now)


def budget_state(standing: Standing) -> BudgetState:
    figures = standing.figures()
    return BudgetState.model_validate({**figures, "resets_at": utc(standing.resets_at)})


async def quote(services: Services, project: str, config: JobConfig) -> JobQuote:
    """The quote of a job the caller has checked as a submit would (submissions.check)."""
    settings = services.settings
    figures = await services.projects.quote_figures(project, config.priority)
    estimates = {lane: estimate(settings, config, lane, figures) for lane in LANES}
    standing = await standing_of(services, project)
    return JobQuote(
        images=planning.images_total(config),
        model=settings.gemini_model,
        lane=config.lane,
        lanes={lane: value.view() for lane, value in estimates.items()},
        budget=None if standing is None else budget_state(standing),
        within_budget=standing is None or standing.allows(estimates[config.lane].micros),
    )


async def check_budget(
    services: Services, project: str, configs: Sequence[JobConfig], indices: Sequence[int] | None = None
) -> None:
    """OverBudget (402, nothing stored) if the jobs of `configs` together (or a redo of `indices` of
    the one job) would cost more than the project's budget has left; costs nothing without a budget."""
    standing = await standing_of(services, project)
    if standing is None or not configs:
        return
    settings = services.settings
    figures = await services.projects.quote_figures(project, min(config.priority for config in configs))
    quoted = [estimate(settings, config, config.lane, figures, indices) for config in configs]
    micros = sum(one.micros for one in quoted)
    if standing.allows(micros):
        return
    lane = configs[0].lane
    what = "This job" if len(configs) == 1 else f"These {len(configs)} jobs"
    message = (
        f"{what} would cost about ${usd(micros):.2f} in the {lane} lane; this project's budget of "
        f"${usd(standing.limit_micros):.2f} per {standing.period} has ${usd(standing.remaining_micros):.2f} left "
        f"(${usd(standing.spent_micros):.2f} spent). It resets at {iso(standing.resets_at)}."
    )
    if lane == "realtime":
        batch = sum(estimate(settings, config, "batch", figures, indices).micros for config in configs)
        if standing.allows(batch):
            message += f' In the batch lane ("lane": "batch") it would cost about ${usd(batch):.2f}.'
    figures_shown: dict[str, float | str] = {"quote_usd": usd(micros), **standing.figures()}
    figures_shown["resets_at"] = iso(standing.resets_at)
    raise OverBudget(message, figures_shown)
