"""The worker's environment settings, a run's limits over them, and the start-up fitness check.

Deployed alone with handler.py (no `shared` package in the image): RunLimits restates
shared.models.RunLimits, which the dispatcher fills from shared.settings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from pydantic import BaseModel, Field


class RunLimits(BaseModel):
    """What the dispatcher allows one run (shared.models.RunLimits): absent, the environment's settings apply."""

    gemini_timeout_seconds: float = Field(gt=0)
    gemini_max_attempts: int = Field(ge=1)
    gemini_backoff_max_seconds: float = Field(ge=0)
    # Downloads, every Gemini attempt and wait, and uploads end this long after the handler starts.
    budget_seconds: float = Field(gt=0)


def _number(name: str, default: str, *, minimum: float, integer: bool = False) -> float:
    """One numeric variable, with an error that names it: a typo must stop the worker, not every job."""
    raw = os.environ.get(name, default).strip()
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, got {raw!r}")
    return value


@dataclass(frozen=True)
class WorkerSettings:
    """Every environment knob of the worker, read in one place."""

    api_key: str
    base_url: str | None
    timeout_seconds: float
    max_attempts: int
    backoff_max_seconds: float
    backoff_base_seconds: float
    concurrency: int
    max_parallel_calls: int
    transfer_max_attempts: int
    transfer_backoff_max_seconds: float

    @classmethod
    def from_env(cls) -> WorkerSettings:
        """Raises ValueError naming the variable that does not parse."""
        env = os.environ
        return cls(
            api_key=env.get("GEMINI_API_KEY", "").strip(),
            base_url=env.get("GEMINI_BASE_URL") or None,
            timeout_seconds=_number("GEMINI_TIMEOUT_SECONDS", "120", minimum=0.001),
            max_attempts=int(_number("GEMINI_MAX_ATTEMPTS", "6", minimum=1, integer=True)),
            backoff_max_seconds=_number("GEMINI_BACKOFF_MAX_SECONDS", "30", minimum=0),
            backoff_base_seconds=_number("GEMINI_BACKOFF_BASE_SECONDS", "1", minimum=0),
            concurrency=int(_number("WORKER_CONCURRENCY", "4", minimum=1, integer=True)),
            max_parallel_calls=int(_number("GEMINI_MAX_PARALLEL", "16", minimum=1, integer=True)),
            transfer_max_attempts=int(_number("TRANSFER_MAX_ATTEMPTS", "5", minimum=1, integer=True)),
            transfer_backoff_max_seconds=_number("TRANSFER_BACKOFF_MAX_SECONDS", "10", minimum=0),
        )

    def with_limits(self, limits: RunLimits | None) -> WorkerSettings:
        """The settings for one run: the dispatcher's limits win, so its retries fit RunPod's executionTimeout."""
        if limits is None:
            return self
        return replace(
            self,
            timeout_seconds=limits.gemini_timeout_seconds,
            max_attempts=limits.gemini_max_attempts,
            backoff_max_seconds=limits.gemini_backoff_max_seconds,
        )


def check_fitness() -> None:
    """Refuse to start misconfigured rather than fail every job it takes.

    Registered with runpod.serverless.register_fitness_check (runpod/serverless/modules/rp_fitness.py):
    on real RunPod (RUNPOD_WEBHOOK_GET_JOB set, runpod/serverless/worker.py) it runs before the first
    job is taken, and a raising check logs its message and ends the worker with exit code 1.
    """
    settings = WorkerSettings.from_env()
    if not settings.api_key:
        raise RuntimeError(
            "GEMINI_API_KEY is not set: every Gemini call would fail with 403 PERMISSION_DENIED; "
            "set it in the endpoint's environment (a RunPod secret)"
        )
    if settings.base_url and not settings.base_url.startswith(("http://", "https://")):
        raise ValueError(f"GEMINI_BASE_URL must be an http(s) URL, got {settings.base_url!r}")
