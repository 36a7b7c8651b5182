"""Bunch's side of RunPod's per-endpoint request limits, so a burst of starts or a bulk cancel
never meets a 429 storm: /run 1,000 per 10 s and 200 at once, /status 2,000 per 10 s and 400 at
once, /cancel 100 per 10 s and 20 at once (docs.runpod.io/serverless/endpoints/operations, "Rate
limits"). Each dispatcher takes `runpod_limit_share` of them.
"""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

WINDOW_SECONDS = 10.0
IN_FLIGHT_WAIT_SECONDS = 0.05
# operation -> (requests per 10 s, requests at once), RunPod's published figures.
RUNPOD_LIMITS: dict[str, tuple[int, int]] = {
    "run": (1000, 200),
    "status": (2000, 400),
    "cancel": (100, 20),
}


class RequestGate:
    """At most `concurrency` requests at once and `per_window` in any `window_seconds` (a sliding
    window, as RunPod states its limits: a burst is fine as long as no 10 s holds more)."""

    def __init__(self, per_window: int, concurrency: int, window_seconds: float = WINDOW_SECONDS) -> None:
        self.per_window = max(1, per_window)
        self.window = window_seconds
        # Monotonic times the answers came, within the last window: RunPod saw each request no later
        # than that, so this window never holds fewer than RunPod's. (Counted from when they were
        # sent, a request slowed on its way, by load or the network, lands in RunPod's next window
        # and not in ours: a 429.) Appended as answers come, so in order.
        self._answered: deque[float] = deque()
        self._in_flight = 0  # sent, not answered: each counts in every window until it is
        self._lock = asyncio.Lock()  # waiters go first come, first served
        self._slots = asyncio.Semaphore(max(1, concurrency))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            await self._take_turn()
            try:
                yield
            finally:
                self._in_flight -= 1
                self._answered.append(time.monotonic())

    async def _take_turn(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._answered and self._answered[0] <= now - self.window:
                    self._answered.popleft()
                if len(self._answered) + self._in_flight < self.per_window:
                    self._in_flight += 1
                    return
                # Every place taken by requests in flight: one of them answers soon.
                wait = self._answered[0] + self.window - now if self._answered else IN_FLIGHT_WAIT_SECONDS
                await asyncio.sleep(max(wait, 0.001))


def gates(share: float) -> dict[str, RequestGate]:
    """A gate per limited operation with `share` of RunPod's limits (never below one at a time)."""
    return {
        operation: RequestGate(int(per_window * share), int(concurrency * share))
        for operation, (per_window, concurrency) in RUNPOD_LIMITS.items()
    }
