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
        self._sent: deque[float] = deque()  # monotonic start times within the last window
        self._lock = asyncio.Lock()  # waiters go first come, first served
        self._slots = asyncio.Semaphore(max(1, concurrency))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._slots:
            await self._take_turn()
            yield

    async def _take_turn(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._sent and self._sent[0] <= now - self.window:
                    self._sent.popleft()
                if len(self._sent) < self.per_window:
                    self._sent.append(now)
                    return
                await asyncio.sleep(self._sent[0] + self.window - now)


def gates(share: float) -> dict[str, RequestGate]:
    """A gate per limited operation with `share` of RunPod's limits (never below one at a time)."""
    return {
        operation: RequestGate(int(per_window * share), int(concurrency * share))
        for operation, (per_window, concurrency) in RUNPOD_LIMITS.items()
    }
