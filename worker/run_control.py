"""Per-run limits on what the worker may still do: the time budget and the run-wide stop.

Both live exactly as long as one handler call: the next run starts with a fresh budget and tries
Gemini again (an operator may have fixed the key or the quota in between).
"""

from __future__ import annotations

import asyncio
import math
import time

from failures import FailureReason


class Deadline:
    """The moment a run must be over by, or none (no limits sent: the per-call settings bound it)."""

    def __init__(self, budget_seconds: float | None, started: float | None = None) -> None:
        """`started`: the time.monotonic() the budget counts from, now if not given."""
        self.budget_seconds = budget_seconds
        start = time.monotonic() if started is None else started
        self._end = None if budget_seconds is None else start + budget_seconds

    def left(self) -> float:
        if self._end is None:
            return math.inf
        return max(0.0, self._end - time.monotonic())

    def cap(self, seconds: float) -> float:
        """A timeout that also ends at the deadline."""
        return min(seconds, self.left())

    def allows(self, wait: float, then: float = 0.0) -> bool:
        """Whether a retry after `wait` still has `then` seconds to run: one that cannot finish is not started."""
        return wait + then < self.left()

    def describe(self) -> str:
        if self.budget_seconds is None:
            return "the run's time (unbounded)"
        return f"the run's time budget of {self.budget_seconds:g} s"


class RunBreaker:
    """Trips on the first answer that means every call of this run would fail the same way (a daily
    quota, a bad key): the run's other items are then not sent to Gemini and fail with that reason."""

    def __init__(self) -> None:
        self._tripped = asyncio.Event()
        self.reason: FailureReason | None = None
        self.detail = ""

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: FailureReason, detail: str) -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail
            self._tripped.set()

    async def sleep(self, seconds: float) -> bool:
        """Wait `seconds`, cut short if the breaker trips meanwhile; True if it has tripped."""
        if self.tripped:
            return True
        try:
            async with asyncio.timeout(seconds):
                await self._tripped.wait()
        except TimeoutError:
            return False
        return True
