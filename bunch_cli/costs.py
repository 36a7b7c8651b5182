"""What jobs cost, for people: a quote's lanes side by side, the budget line, a job's cost, and
the figures of a submit refused over the budget (POST /api/jobs/quote, 402, the status's `cost`)."""

from collections.abc import Callable
from datetime import datetime
from typing import Any

from rich.table import Table

from bunch_cli.units import eta_text, usd

LANES = ("realtime", "batch")


def when(value: Any) -> str:
    """An ISO-8601 moment in the local time zone."""
    if not value:
        return "later"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _count(value: Any, _: str) -> str:
    return f"{int(value):,}"


def _dollars(value: Any, _: str) -> str:
    return usd(value)


def _worker_seconds(value: Any, _: str) -> str:
    return f"{float(value):,.1f}"


def _wait(value: Any, lane: str) -> str:
    if value is None:  # the server has no figure yet: a batch is promised within 24 hours
        return "within 24h" if lane == "batch" else "-"
    return eta_text(float(value)) or "0s"


# The quote's rows: label, LaneQuote field, how a value is written.
ROWS: tuple[tuple[str, str, Callable[[Any, str], str]], ...] = (
    ("runs", "runs", _count),
    ("prompt tokens", "prompt_tokens", _count),
    ("output tokens", "output_tokens", _count),
    ("Gemini USD", "gemini_usd", _dollars),
    ("RunPod worker-seconds", "runpod_worker_seconds", _worker_seconds),
    ("RunPod USD", "runpod_usd", _dollars),
    ("total USD", "total_usd", _dollars),
    ("expected wait", "expected_wait_seconds", _wait),
    ("expected duration", "expected_duration_seconds", _wait),
)


def quote_table(quote: dict[str, Any]) -> Table:
    """Both lanes side by side; the chosen lane's column is marked."""
    chosen = quote.get("lane")
    lanes: dict[str, dict[str, Any]] = quote.get("lanes") or {}
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("", style="bold", no_wrap=True)
    for lane in LANES:
        table.add_column(f"{lane} (chosen)" if lane == chosen else lane, justify="right", no_wrap=True)
    for label, field, write in ROWS:
        cells = []
        for lane in LANES:
            value = (lanes.get(lane) or {}).get(field)
            cells.append("-" if value is None and write is not _wait else write(value, lane))
        table.add_row(label, *cells)
    return table


def budget_line(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "No budget is set for this project."
    return (
        f"Budget: {usd(budget.get('remaining_usd'))} of {usd(budget.get('limit_usd'))} left this "
        f"{budget.get('period')} (spent {usd(budget.get('spent_usd'))}); resets at {when(budget.get('resets_at'))}."
    )


def over_budget_line(quote: dict[str, Any]) -> str | None:
    """A warning when a submit of this quote would be refused, else None."""
    if quote.get("within_budget", True):
        return None
    lane = str(quote.get("lane"))
    total = (quote.get("lanes") or {}).get(lane, {}).get("total_usd")
    return f"Over budget: {usd(total)} on the {lane} lane is more than is left; a submit would be refused (402)."


def refusal_text(detail: str, body: dict[str, Any]) -> str:
    """A 402's detail and figures, as one message."""
    return (
        f"{detail} (HTTP 402). This job: {usd(body.get('quote_usd'))}; spent {usd(body.get('spent_usd'))} of "
        f"{usd(body.get('limit_usd'))} this {body.get('period')}, {usd(body.get('remaining_usd'))} left; "
        f"the budget resets at {when(body.get('resets_at'))}."
    )


def cost_text(cost: dict[str, Any] | None) -> str:
    """A job's cost: its total and parts, or "" when the job has none yet."""
    if not cost:
        return ""
    tokens = f"{int(cost.get('prompt_tokens') or 0):,} prompt + {int(cost.get('output_tokens') or 0):,} output tokens"
    runpod = f"RunPod {usd(cost.get('runpod_usd'))} for {float(cost.get('runpod_seconds') or 0):,.1f} s"
    return f"{usd(cost.get('total_usd'))} (Gemini {usd(cost.get('gemini_usd'))} for {tokens}; {runpod})"


def lane_of(job: dict[str, Any]) -> str:
    """A job's lane (jobs from before lanes existed are realtime)."""
    cost = job.get("cost") or {}
    return str(job.get("lane") or cost.get("lane") or (job.get("config") or {}).get("lane") or "realtime")
