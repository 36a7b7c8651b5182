"""The emulator's runtime knobs (POST /_emulator/config), counters (GET /_emulator/stats) and the
per-prompt bookkeeping of counted directives."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from aiohttp import web

ImageMode = Literal["small", "realistic"]
IMAGE_MODES: tuple[ImageMode, ...] = ("small", "realistic")
# The jitter's lognormal sigma and cap (in multiples of its scale): see jitter_ms.
JITTER_SIGMA = 0.5
JITTER_CAP = 10.0


@dataclass
class EmulatorConfig:
    latency_ms: int = 0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    # After this many images since the last reset every call gets the per-day 429; 0 is no limit.
    daily_quota_images: int = 0
    latency_jitter_ms: int = 0
    image_mode: ImageMode = "small"
    # Keys revoked at run time (deleted in Google's console): they answer 400 API_KEY_INVALID.
    revoked_keys: tuple[str, ...] = ()
    # A batch's life (batches.py), read when it is created: this long in BATCH_STATE_PENDING, then at
    # least this long in BATCH_STATE_RUNNING (longer while its requests are still being generated).
    batch_pending_seconds: float = 1.0
    batch_running_seconds: float = 2.0
    # A batch not finished this long after its creation expires, with no results (Batch API guide:
    # "a batch not completed within 48 hours expires").
    batch_expire_seconds: float = 172800.0
    # Uploaded files are deleted this long after their upload (Files API: "stored for 48 hours").
    file_ttl_seconds: float = 172800.0


class ConfigError(ValueError):
    pass


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a number")
    return float(value)


def updated_config(config: EmulatorConfig, update: Any) -> EmulatorConfig:
    """`config` with the keys of `update` applied, each checked; raises ConfigError naming the bad key."""
    known = {f.name for f in fields(EmulatorConfig)}
    if not isinstance(update, dict) or set(update) - known:
        raise ConfigError(f"allowed keys: {sorted(known)}")
    changes: dict[str, Any] = {}
    for key, value in update.items():
        if key == "image_mode":
            if value not in IMAGE_MODES:
                raise ConfigError(f"image_mode must be one of {list(IMAGE_MODES)}")
            changes[key] = value
        elif key.endswith("_rate"):
            if not 0 <= _number(key, value) <= 1:
                raise ConfigError(f"{key} must be within 0..1")
            changes[key] = float(value)
        elif key == "revoked_keys":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ConfigError("revoked_keys must be a list of strings")
            changes[key] = tuple(value)
        elif key.endswith("_seconds"):
            if _number(key, value) < 0:
                raise ConfigError(f"{key} must be >= 0")
            changes[key] = float(value)
        elif key == "daily_quota_images":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError("daily_quota_images must be an integer >= 0")
            changes[key] = value
        else:  # latency_ms, latency_jitter_ms
            if _number(key, value) < 0:
                raise ConfigError(f"{key} must be >= 0")
            changes[key] = int(value)
    return replace(config, **changes)


def jitter_ms(scale_ms: float, rng: random.Random | None = None) -> float:
    """Extra latency: scale x lognormal(mu=0, sigma=0.5), capped at 10 x scale.

    Median = scale, mean ≈ 1.13 x scale, 95th percentile ≈ 2.3 x scale, 99th ≈ 3.2 x scale: a long right
    tail like real generation times (4-15 s typical with rare slow calls), never below zero.
    """
    if scale_ms <= 0:
        return 0.0
    draw = (rng or random).lognormvariate(0.0, JITTER_SIGMA)
    return scale_ms * min(draw, JITTER_CAP)


@dataclass
class EmulatorState:
    defaults: EmulatorConfig
    image_px: int
    # None: any non-empty key is accepted.
    api_keys: frozenset[str] | None = None
    max_request_bytes: int = 0
    config: EmulatorConfig = field(default_factory=EmulatorConfig)
    calls: int = 0
    images: int = 0
    # Images counted against daily_quota_images; POST /_emulator/quota/reset zeroes only this.
    quota_images: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    by_finish_reason: Counter[str] = field(default_factory=Counter)
    # (directive, prompt text) -> how many calls that counted directive has already affected.
    directive_hits: Counter[tuple[str, str]] = field(default_factory=Counter)
    serial: int = 0
    # Bumped by reset, so a call still in flight from before a reset does not leak into the new stats.
    epoch: int = 0
    # Bumped by either reset, so a call that reserved an image before it does not give it back after.
    quota_epoch: int = 0
    # The Batch and Files APIs (batches.py, files.py): answers of their endpoints, and their work.
    batch_api_by_status: Counter[str] = field(default_factory=Counter)
    batch_api_by_error: Counter[str] = field(default_factory=Counter)
    batches_created: int = 0
    # Requests of batches that were run (answered or refused), and the refusals by kind.
    batch_requests: int = 0
    batch_request_errors: Counter[str] = field(default_factory=Counter)
    files_uploaded: int = 0
    file_downloads: int = 0

    def reset(self) -> None:
        self.epoch += 1
        self.config = replace(self.defaults)
        self.calls = self.images = self.serial = 0
        self.batches_created = self.batch_requests = self.files_uploaded = self.file_downloads = 0
        self.reset_quota()
        for counter in (
            self.by_status, self.by_error, self.by_finish_reason, self.directive_hits, self.batch_api_by_status,
            self.batch_api_by_error, self.batch_request_errors,
        ):  # fmt: skip
            counter.clear()

    def reset_quota(self) -> None:
        self.quota_epoch += 1
        self.quota_images = 0

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "by_status": dict(self.by_status),
            "by_error": dict(self.by_error),
            "by_finish_reason": dict(self.by_finish_reason),
            "images": self.images,
            "quota_images": self.quota_images,
            "batches_created": self.batches_created,
            "batch_requests": self.batch_requests,
            "batch_request_errors": dict(self.batch_request_errors),
            "batch_api_by_status": dict(self.batch_api_by_status),
            "batch_api_by_error": dict(self.batch_api_by_error),
            "files_uploaded": self.files_uploaded,
            "file_downloads": self.file_downloads,
            "config": asdict(self.config),
        }

    def take_hit(self, directive: str, text: str, limit: int | None) -> bool:
        """Whether a counted directive ([emu:NAMExN]) still applies to this call, and count it if so.
        Without xN it applies to every call."""
        key = (directive, text)
        if limit is not None and self.directive_hits[key] >= limit:
            return False
        self.directive_hits[key] += 1
        return True


STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("state", EmulatorState)
