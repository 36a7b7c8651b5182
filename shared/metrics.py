"""Prometheus metrics: what each process counts, and the queue figures read from Redis at scrape time.

Counters and histograms measure this process's own work. Gauges of shared state (jobs by status,
runs in flight, stream lag, dead letters) are read from Redis when scraped, so every replica reports
the same truth and nothing needs to be kept in memory between scrapes.
"""

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis

from shared import keys
from shared.errors import Misconfigured, Unavailable
from shared.models import JobStatus
from shared.pricing import MICROS_PER_USD, RunCost
from shared.redis_connection import check
from shared.redis_memory import read_memory

log = logging.getLogger(__name__)

JOBS = Gauge("bunch_jobs", "Jobs by status, all projects", ["status"])
RUNS_IN_FLIGHT = Gauge("bunch_runs_in_flight", "Runs started on RunPod and not final yet")
RUNS_WAITING_RETRY = Gauge("bunch_runs_waiting_retry", "Runs waiting to be started again (retries, redos)")
STREAM_LAG = Gauge("bunch_stream_lag", "Stream entries not yet read by the group", ["stream", "group"])
STREAM_PENDING = Gauge("bunch_stream_pending", "Stream entries read but not acknowledged", ["stream", "group"])
REDIS_MEMORY = Gauge("bunch_redis_memory_bytes", "Redis memory: used, and its maxmemory limit (0: none)", ["kind"])
DEAD_LETTERS = Gauge("bunch_dead_letters", "Messages given up on after too many deliveries, waiting for a re-drive")

DISPATCH_LATENCY = Histogram(
    "bunch_dispatch_latency_seconds",
    "From claiming a run to RunPod accepting it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RUNS_STARTED = Counter("bunch_runs_started_total", "Runs RunPod accepted")
UNREPLICATED_WRITES = Counter(
    "bunch_redis_unreplicated_writes_total",
    "Claim and outcome writes no replica confirmed within BUNCH_REDIS_WAIT_TIMEOUT_MS (WAIT)",
)
RUNPOD_ERRORS = Counter("bunch_runpod_errors_total", "RunPod failures by kind", ["kind"])
# Alert on any increase: RunPod answered 401/403/405, so Bunch's RunPod key or endpoint is refused.
RUNPOD_REFUSED = Counter(
    "bunch_runpod_refused_total", "RunPod calls refused with 401, 403 or 405 (key or endpoint)", ["operation"]
)
UPSTREAM_HOLDS = Counter(
    "bunch_upstream_holds_total", "Times the whole queue was held because every run would fail upstream", ["reason"]
)
GEMINI_ERRORS = Counter("bunch_gemini_errors_total", "Images that failed at Gemini, by reason", ["kind"])
IMAGES = Counter("bunch_images_total", "Image outcomes recorded", ["status"])
# Counted when a run's outcome is recorded (shared/stores/runs.py), so an outcome delivered twice
# counts once; USD as priced by the settings' tables (shared/pricing.py).
COST = Counter("bunch_cost_usd_total", "Recorded cost of runs, USD, by lane and what was paid for", ["lane", "kind"])
GEMINI_TOKENS = Counter("bunch_gemini_tokens_total", "Gemini tokens of recorded runs", ["lane", "direction"])
BUDGET_PAUSES = Counter("bunch_budget_pauses_total", "Projects paused because their spend reached their budget")
GEMINI_BATCHES = Counter(
    "bunch_gemini_batches_total",
    "Gemini batch jobs of the batch lane: submitted, succeeded, canceled, or how they ended without results",
    ["event"],
)
PACKAGING_BYTES = Counter("bunch_packaging_bytes_total", "Bytes of ZIPs written")
PACKAGING_SECONDS = Histogram(
    "bunch_packaging_seconds", "Time to build one job's ZIP", buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
)
HTTP_REQUESTS = Counter("bunch_http_requests_total", "Gateway requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "bunch_http_request_seconds", "Gateway request time", ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
)


def count_cost(cost: RunCost) -> None:
    COST.labels(cost.lane, "gemini").inc(cost.gemini_micros / MICROS_PER_USD)
    COST.labels(cost.lane, "runpod").inc(cost.runpod_micros / MICROS_PER_USD)
    GEMINI_TOKENS.labels(cost.lane, "input").inc(cost.prompt_tokens)
    GEMINI_TOKENS.labels(cost.lane, "output").inc(cost.output_tokens)


async def refresh_shared_gauges(redis: Redis) -> None:
    """Read the queue's shared figures from Redis into the gauges."""
    counts = await redis.hgetall(keys.JOB_COUNTS)
    for status in JobStatus:
        JOBS.labels(status.value).set(max(0, int(counts.get(status.value, 0))))
    RUNS_IN_FLIGHT.set(await redis.zcard(keys.RUNNING))
    RUNS_WAITING_RETRY.set(await redis.zcard(keys.RETRY_QUEUE))
    DEAD_LETTERS.set(await redis.xlen(keys.DEAD_LETTERS_STREAM))
    memory = await read_memory(redis)
    REDIS_MEMORY.labels("used").set(memory.used)
    REDIS_MEMORY.labels("limit").set(memory.limit)
    for stream, group in keys.CONSUMED_STREAMS:
        info: dict[str, Any] = {}
        if await redis.exists(stream):
            info = next((g for g in await redis.xinfo_groups(stream) if g["name"] == group), {})
        STREAM_LAG.labels(stream, group).set(info.get("lag") or 0)
        STREAM_PENDING.labels(stream, group).set(info.get("pending") or 0)


async def render(redis: Redis) -> bytes:
    try:
        await refresh_shared_gauges(redis)
    except Exception:  # a scrape must still show this process's own counters
        log.exception("could not read the queue figures from Redis")
    return generate_latest()


async def serve(redis: Redis, port: int) -> web.AppRunner:
    """/metrics and the probes on a port of their own, for the processes without an HTTP API.

    /livez answers from the event loop that runs the service's work, so an answer shows that loop
    turns: it never asks Redis, and a Redis outage restarts no pod. /readyz is 503 while Redis
    (the state of record) does not answer, with the reason.
    """

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await render(redis), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ready(_: web.Request) -> web.Response:
        try:
            await check(redis)
        except (Misconfigured, Unavailable) as exc:
            return web.Response(status=503, text=f"not ready: {exc.message}")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/livez", live)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner
