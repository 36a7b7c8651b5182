"""What Bunch knows about its upstreams as a whole, shared by every replica: the hold that stops
every run from starting while Gemini would refuse them all (its daily quota is spent, its key is
refused; RunPod refuses Bunch's key), and RunPod's last /health figures.

The hold is read by the claim script (shared/lua/record_started_and_claim.lua), so no dispatcher
starts a run while it is in place; a hold with an end (a daily quota, reset at midnight Pacific
time) ends by itself there. Scope: the whole queue, because the Gemini key and the RunPod key are
the deployment's, shared by every project.
"""

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from shared import keys, scripts

# Gemini's daily quotas reset at midnight Pacific time (ai.google.dev/gemini-api/docs/rate-limits).
QUOTA_ZONE = ZoneInfo("America/Los_Angeles")
# RunPod's figures older than this many read intervals are not shown: no dispatcher is reading them.
HEALTH_KEPT_INTERVALS = 4


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str  # quota_exhausted, auth_failed, runpod_auth_failed, runpod_unreachable
    detail: str
    since: float
    until: float | None  # None: until an operator releases it


def next_quota_reset(now: float) -> float:
    """The next midnight in Pacific time after `now`, daylight saving time included."""
    local = datetime.fromtimestamp(now, QUOTA_ZONE)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), QUOTA_ZONE)
    return midnight.timestamp()


class UpstreamStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def hold(self, reason: str, detail: str, until: float | None, now: float | None = None) -> bool:
        """Hold the queue; False when a hold that lasts longer was already in place (kept)."""
        now = time.time() if now is None else now
        args = [reason, detail[:500], now, 0 if until is None else until]
        return (await scripts.HOLD_UPSTREAM(self.redis, [], args)).done

    async def release(self) -> bool:
        """End the hold (an operator fixed the key or the billing); False when there was none."""
        return bool(await self.redis.delete(keys.UPSTREAM_HOLD))

    async def current(self, now: float | None = None) -> Hold | None:
        return parse_hold(await self.redis.hgetall(keys.UPSTREAM_HOLD), time.time() if now is None else now)

    async def record_health(self, figures: dict[str, Any], interval_seconds: float) -> None:
        body = json.dumps({"fetched_at": time.time(), **figures})
        ttl = max(1, round(interval_seconds * HEALTH_KEPT_INTERVALS))
        await self.redis.set(keys.RUNPOD_HEALTH, body, ex=ttl)

    async def health(self) -> dict[str, Any] | None:
        return parse_health(await self.redis.get(keys.RUNPOD_HEALTH))


def parse_hold(raw: dict[str, str], now: float) -> Hold | None:
    """The hold in place at `now` from its hash (one whose end has passed is not: the next claim
    deletes it)."""
    if not raw:
        return None
    ends = float(raw.get("until") or 0)
    if ends and ends <= now:
        return None
    return Hold(raw.get("reason", ""), raw.get("detail", ""), float(raw.get("since") or 0), ends or None)


def parse_health(raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        figures = json.loads(raw)
    except ValueError:
        return None
    return figures if isinstance(figures, dict) else None
