"""Budgets the operator sets per project (BUNCH_PROJECT_BUDGETS="pa:100/day,pb:1000/month", USD),
and the periods they count over: the UTC day and the UTC calendar month. No Redis here
(shared/stores/budgets.py reads and writes the figures)."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, cast

from shared.pricing import MICROS_PER_USD, usd

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")


@dataclass(frozen=True, slots=True)
class Budget:
    limit_usd: float
    period: Period

    @property
    def limit_micros(self) -> int:
        return round(self.limit_usd * MICROS_PER_USD)


def parse_budgets(text: str) -> dict[str, Budget]:
    """ "pa:100/day,pb:1000/month" -> {"pa": Budget(100.0, "day"), ...}; a malformed entry, an
    amount <= 0 or another period is an error."""
    budgets: dict[str, Budget] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        project, sep, value = entry.rpartition(":")
        amount, slash, period = value.partition("/")
        try:
            limit = float(amount)
        except ValueError:
            limit = 0.0
        if not sep or not project or not slash or period not in PERIODS or not 0 < limit < 1e9:
            raise ValueError(f"project budget {entry!r}: expected project:amount/day or project:amount/month (USD)")
        budgets[project] = Budget(limit, cast(Period, period))
    return budgets


def period_start(period: Period, now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


def period_end(period: Period, now: float) -> float:
    """When the period holding `now` ends: the next UTC midnight, or the first of the next month."""
    start = datetime.fromtimestamp(period_start(period, now), UTC)
    if period == "day":
        return (start + timedelta(days=1)).timestamp()
    return (
        start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    ).timestamp()


def period_id(period: Period, now: float) -> str:
    """The period's name in its spend key: "day:2026-12-03", "month:2026-12"."""
    moment = datetime.fromtimestamp(now, UTC)
    return f"day:{moment:%Y-%m-%d}" if period == "day" else f"month:{moment:%Y-%m}"


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a project stands against its budget now."""

    period: Period
    limit_micros: int
    spent_micros: int
    resets_at: float  # the period's end

    @property
    def remaining_micros(self) -> int:
        return max(0, self.limit_micros - self.spent_micros)

    def allows(self, micros: int) -> bool:
        return micros <= self.remaining_micros

    def figures(self) -> dict[str, float | str]:
        """The figures a refusal and a quote show, in USD."""
        return {
            "period": self.period,
            "limit_usd": usd(self.limit_micros),
            "spent_usd": usd(self.spent_micros),
            "remaining_usd": usd(self.remaining_micros),
        }
