"""The emulated endpoint: its queue, its workers, its limits and faults, and what /health reports."""

import asyncio
import json
import logging
import secrets
from dataclasses import asdict
from typing import Any, Protocol

from aiohttp import web

from deploy.emulators.runpod.jobs import Board, Seat
from deploy.emulators.runpod.limits import Limiter
from deploy.emulators.runpod.model import (
    DEFAULT_TTL_MS,
    IN_QUEUE,
    SEVEN_DAYS_MS,
    ApiError,
    Config,
    Faults,
    Job,
)
from deploy.emulators.runpod.webhooks import Webhooks

log = logging.getLogger("emulator.runpod")

SWEEP_EVERY_S = 5.0


class Pool(Protocol):
    async def start(self, base_url: str) -> None: ...
    async def stop(self) -> None: ...
    def states(self) -> list[tuple[Seat, str]]: ...
    def describe(self) -> list[dict[str, Any]]: ...
    def signal(self, pod_id: str, signame: str) -> bool: ...


class Emulator:
    def __init__(self, config: Config, faults: Faults | None = None, limiter: Limiter | None = None) -> None:
        self.config = config
        self.faults = faults or Faults()
        self.limiter = limiter or Limiter()
        self.webhooks = Webhooks(config, lambda: self.faults, lambda: self.board.counters)
        self.board = Board(config, self.faults, self.webhooks.job_ended)
        self.pool: Pool | None = None
        # RUNPOD_AI_API_KEY of its workers: the worker API checks it, and it is not the REST key.
        self.worker_key = secrets.token_urlsafe(24)
        self._sweeper: asyncio.Task[None] | None = None

    def set_faults(self, faults: Faults) -> None:
        self.faults = self.board.faults = faults

    # ---- lifecycle

    async def start(self) -> None:
        await self.webhooks.start()
        self._sweeper = asyncio.create_task(self._sweep())

    async def start_workers(self, base_url: str) -> None:
        if self.pool is not None:
            await self.pool.start(base_url)

    async def stop_workers(self) -> None:
        """Before the HTTP server closes: workers finishing their jobs must still reach job-done."""
        self.board.drain()
        if self.pool is not None:
            await self.pool.stop()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.webhooks.stop()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self.board.sweep()

    # ---- submission

    def submit(self, endpoint: str, raw: bytes, limit: int, result_ttl_s: float) -> Job:
        body = _parse_body(raw, limit)
        timeout_ms, ttl_ms = self._parse_policy(body.get("policy"))
        webhook = body.get("webhook")
        if webhook is not None and not isinstance(webhook, str):
            raise ApiError(400, "webhook must be a string")
        timeout_s, ttl_s = timeout_ms / 1000, ttl_ms / 1000
        return self.board.submit(endpoint, body["input"], webhook or None, timeout_s, ttl_s, result_ttl_s)

    def _parse_policy(self, policy: Any) -> tuple[int | float, int | float]:
        """(executionTimeout, ttl) in ms, within RunPod's bounds (job-operations "Execution policies":
        executionTimeout 5 s - 7 d, ttl 10 s - 7 d); out of range is refused with 400."""
        if policy is None:
            policy = {}
        if not isinstance(policy, dict):
            raise ApiError(400, "policy must be an object")
        values = {
            "executionTimeout": policy.get("executionTimeout", self.config.execution_timeout_ms),
            "ttl": policy.get("ttl", DEFAULT_TTL_MS),
        }
        bounds = {"executionTimeout": self.config.min_execution_timeout_ms, "ttl": self.config.min_ttl_ms}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(400, f"policy.{name} must be a number of milliseconds")
            if not bounds[name] <= value <= SEVEN_DAYS_MS:
                raise ApiError(
                    400,
                    f"policy.{name} must be between {bounds[name]} and {SEVEN_DAYS_MS} ms "
                    f"({bounds[name] / 1000:g} s to 7 days), got {value}",
                )
        return values["executionTimeout"], values["ttl"]

    # ---- workers

    def note_unhealthy(self, pod_id: str, reason: str) -> None:
        note = getattr(self.pool, "note_unhealthy", None)
        if note is not None:
            note(pod_id, reason)

    def note_refresh(self, pod_id: str) -> None:
        note = getattr(self.pool, "note_refresh", None)
        if note is not None:
            note(pod_id)

    # ---- reports

    def health(self) -> dict[str, Any]:
        """GET /health (https://docs.runpod.io/serverless/endpoints/job-operations, "Check endpoint
        health"): job counts and worker states, from the real workers and what they hold. RunPod's
        throttled (no machine available) never happens here."""
        workers = dict.fromkeys(("idle", "initializing", "ready", "running", "throttled", "unhealthy"), 0)
        for _, state in self.pool.states() if self.pool else []:
            if state in workers:
                workers[state] += 1
        workers["ready"] = workers["idle"]
        counters = self.board.counters
        return {
            "jobs": {
                "completed": counters.completed,
                "failed": counters.failed,
                "inProgress": len(self.board.running),
                "inQueue": self.board.count(IN_QUEUE),
                "retried": counters.retried,
            },
            "workers": workers,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **asdict(self.board.counters),
            "in_progress": len(self.board.running),
            "in_queue": self.board.count(IN_QUEUE),
            "rate_limited": dict(self.limiter.refused),
        }

    def reset(self) -> None:
        self.board.reset()
        self.webhooks.cancel_pending()  # deliveries of the old epoch
        self.limiter.reset()


def _parse_body(raw: bytes, limit: int) -> dict[str, Any]:
    if len(raw) > limit:
        raise ApiError(400, f"request body too large: {len(raw)} bytes, limit {limit}")
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict) or "input" not in body:
        raise ApiError(400, "request body must be a JSON object with an 'input' field")
    return body


EMULATOR_KEY: web.AppKey[Emulator] = web.AppKey("emulator", Emulator)
