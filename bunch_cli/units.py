"""How figures are written for people: durations and dollars."""

from typing import Any


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def usd(value: Any) -> str:
    """Dollars: cents from a dollar up, four decimals below (one image costs a few cents)."""
    if value is None:
        return "-"
    amount = float(value)
    return f"${amount:,.2f}" if abs(amount) >= 1 or amount == 0 else f"${amount:.4f}"
