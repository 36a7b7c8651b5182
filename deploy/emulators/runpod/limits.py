"""RunPod's per-endpoint rate and concurrency limits, answered with 429 like RunPod.

https://docs.runpod.io/serverless/references/operations ("Rate limits"): /run 1,000 requests per
10 s and 200 concurrent; /runsync 2,000 per 10 s and 400 concurrent; /status (and /stream) 2,000 per
10 s and 400 concurrent; /cancel 100 per 10 s and 20 concurrent; /purge-queue 2 per 10 s. No
Retry-After is documented, so none is sent. A refused request does not use up the window.
"""

import contextlib
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from deploy.emulators.runpod.model import ApiError


@dataclass(frozen=True)
class Limit:
    requests: int  # at most this many accepted requests ...
    per_seconds: float  # ... in any window this long
    concurrent: int | None = None  # and at most this many in flight at once (None: no bound)

    def describe(self) -> str:
        text = f"{self.requests} requests per {self.per_seconds:g} s"
        return text if self.concurrent is None else f"{text}, {self.concurrent} concurrent"


DEFAULT_LIMITS: dict[str, Limit] = {
    "run": Limit(1000, 10.0, 200),
    "runsync": Limit(2000, 10.0, 400),
    "status": Limit(2000, 10.0, 400),
    "cancel": Limit(100, 10.0, 20),
    "purge-queue": Limit(2, 10.0, None),
}


def parse_limit(text: str) -> tuple[str, Limit]:
    """`OP=REQUESTS/SECONDS[/CONCURRENT]`, e.g. `run=1000/10/200` (the CLI's --limit)."""
    op, sep, rest = text.partition("=")
    parts = rest.split("/")
    if not sep or op not in DEFAULT_LIMITS or len(parts) not in (2, 3):
        raise ValueError(f"limit {text!r}: expected OP=REQUESTS/SECONDS[/CONCURRENT], OP in {sorted(DEFAULT_LIMITS)}")
    concurrent = int(parts[2]) if len(parts) == 3 else None
    return op, check_limit(op, {"requests": int(parts[0]), "per_seconds": float(parts[1]), "concurrent": concurrent})


def check_limit(op: str, value: Any) -> Limit:
    if not isinstance(value, dict) or set(value) - {"requests", "per_seconds", "concurrent"}:
        raise ValueError(f"limit {op}: expected an object with requests, per_seconds and concurrent")
    requests, per_seconds = value.get("requests"), value.get("per_seconds")
    concurrent = value.get("concurrent")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ValueError(f"limit {op}: requests must be a positive integer")
    if isinstance(per_seconds, bool) or not isinstance(per_seconds, int | float) or per_seconds <= 0:
        raise ValueError(f"limit {op}: per_seconds must be a positive number")
    if concurrent is not None and (isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1):
        raise ValueError(f"limit {op}: concurrent must be a positive integer or null")
    return Limit(requests, float(per_seconds), concurrent)


class Limiter:
    """A sliding window of accepted requests and a count of requests in flight, per (endpoint, op)."""

    def __init__(self, limits: dict[str, Limit] | None = None) -> None:
        self.limits = dict(DEFAULT_LIMITS)
        self.limits.update(limits or {})
        self._accepted: dict[tuple[str, str], deque[float]] = {}
        self._in_flight: dict[tuple[str, str], int] = {}
        self.refused: Counter[str] = Counter()  # 429s answered by operation, since the last reset

    def update(self, changes: Any) -> None:
        """Validate everything first so a bad request changes nothing."""
        if not isinstance(changes, dict):
            raise ValueError("limits must be an object keyed by operation")
        checked = {}
        for op, value in changes.items():
            if op not in DEFAULT_LIMITS:
                raise ValueError(f"unknown operation {op!r}; known: {sorted(DEFAULT_LIMITS)}")
            checked[op] = check_limit(op, value)
        self.limits.update(checked)

    def reset(self) -> None:
        self._accepted.clear()  # requests in flight keep their slot until they end
        self.refused.clear()

    def public(self) -> dict[str, Any]:
        return {op: asdict(limit) for op, limit in self.limits.items()}

    @contextlib.contextmanager
    def admit(self, endpoint: str, op: str) -> Iterator[None]:
        limit = self.limits[op]
        key = (endpoint, op)
        now = time.monotonic()
        window = self._accepted.setdefault(key, deque())
        while window and window[0] <= now - limit.per_seconds:
            window.popleft()
        in_flight = self._in_flight.get(key, 0)
        if len(window) >= limit.requests or (limit.concurrent is not None and in_flight >= limit.concurrent):
            self.refused[op] += 1
            raise ApiError(429, f"Too Many Requests: /{op} allows {limit.describe()}")
        window.append(now)
        self._in_flight[key] = in_flight + 1
        try:
            yield
        finally:
            self._in_flight[key] -= 1
