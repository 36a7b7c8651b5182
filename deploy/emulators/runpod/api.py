"""RunPod's queue-based endpoint REST API (https://docs.runpod.io/serverless/endpoints/job-operations,
https://docs.runpod.io/serverless/references/operations), the worker job API beside it, and the
emulator's own /_emulator routes (counters, jobs, faults, settings, workers; no auth).

REST calls need `Authorization: Bearer <key>` (any non-empty key unless --api-key is set); every
operation but /health and /retry is rate and concurrency limited per endpoint (limits.py).
"""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from aiohttp import web

from deploy.emulators.runpod import worker_api
from deploy.emulators.runpod.emulator import EMULATOR_KEY, Emulator
from deploy.emulators.runpod.limits import Limiter
from deploy.emulators.runpod.model import (
    FAILED,
    FINAL,
    RUN_LIMIT_BYTES,
    RUNSYNC_LIMIT_BYTES,
    TIMED_OUT,
    ApiError,
    Faults,
)

RUNSYNC_DEFAULT_WAIT_MS = 90_000
RUNSYNC_MAX_WAIT_MS = 300_000


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _emulator(request: web.Request) -> Emulator:
    return request.app[EMULATOR_KEY]


@web.middleware
async def api_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/v2/"):
        emulator = _emulator(request)
        parts = request.path.split("/")  # "", "v2", endpoint, operation, ...
        if len(parts) > 3 and parts[3] in worker_api.WORKER_OPS:
            if not worker_api.worker_authorized(request, emulator.worker_key):
                return _error(401, "Unauthorized")
        elif not _authorized(request, emulator):
            return _error(401, "Unauthorized")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)


def _authorized(request: web.Request, emulator: Emulator) -> bool:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return False
    expected = emulator.config.api_key
    return expected is None or key == expected


def _endpoint(request: web.Request) -> str:
    return request.match_info["endpoint"]


# ------------------------------------------------------------------------------------ REST


async def run_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    counters = emulator.board.counters
    counters.runs_received += 1
    raw = await request.read()
    counters.max_run_body_bytes = max(counters.max_run_body_bytes, len(raw))
    with emulator.limiter.admit(_endpoint(request), "run"):
        if emulator.faults.take("run_http_429"):
            return _error(429, "Too Many Requests")
        if emulator.faults.take("run_http_500"):
            return _error(500, "Internal Server Error")
        job = emulator.submit(_endpoint(request), raw, RUN_LIMIT_BYTES, emulator.config.result_ttl_seconds)
        answer = {"id": job.id, "status": job.status}
        if emulator.faults.run_answer_delay_ms:
            await asyncio.sleep(emulator.faults.run_answer_delay_ms / 1000)
    return web.json_response(answer)


async def runsync_route(request: web.Request) -> web.Response:
    """Waits up to ?wait= ms (default 90 s, at most 5 min) and answers the /status body: final, or
    IN_QUEUE / IN_PROGRESS for the caller to poll. Results are kept 1 min."""
    emulator = _emulator(request)
    with emulator.limiter.admit(_endpoint(request), "runsync"):
        raw = await request.read()
        job = emulator.submit(_endpoint(request), raw, RUNSYNC_LIMIT_BYTES, emulator.config.runsync_result_ttl_seconds)
        wait_ms = min(_int_query(request, "wait", RUNSYNC_DEFAULT_WAIT_MS), RUNSYNC_MAX_WAIT_MS)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.done.wait(), timeout=max(0, wait_ms) / 1000)
    if emulator.board.jobs.get(job.id) is not job:
        return _error(404, "job not found")  # its ttl ran out, or a purge or reset removed it
    return web.json_response(job.status_body())


def _int_query(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


async def status_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    with emulator.limiter.admit(_endpoint(request), "status"):
        if emulator.faults.take("status_http_429"):
            return _error(429, "Too Many Requests")
        if emulator.faults.take("status_http_500"):
            return _error(500, "Internal Server Error")
        if emulator.faults.take("status_http_405"):
            # What a deleted endpoint or a route RunPod withdrew answers (seen in the field).
            return _error(405, "Method Not Allowed")
        job = emulator.board.lookup(_endpoint(request), request.match_info["job_id"])
        if job is None or (emulator.faults.expire_results and job.status in FINAL):
            return _error(404, "job not found")
        return web.json_response(job.status_body())


async def stream_route(request: web.Request) -> web.Response:
    """A generator handler's partial outputs not read yet (shares /status's limits)."""
    emulator = _emulator(request)
    with emulator.limiter.admit(_endpoint(request), "status"):
        job = emulator.board.lookup(_endpoint(request), request.match_info["job_id"])
        if job is None:
            return _error(404, "job not found")
        chunks, job.stream = job.stream, []
        return web.json_response({"id": job.id, "status": job.status, "stream": [{"output": c} for c in chunks]})


async def cancel_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    emulator.board.counters.cancel_calls += 1
    with emulator.limiter.admit(_endpoint(request), "cancel"):
        job = emulator.board.lookup(_endpoint(request), request.match_info["job_id"])
        if job is None:
            return _error(404, "job not found")
        emulator.board.cancel(job)
        return web.json_response({"id": job.id, "status": job.status})


async def retry_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    job = emulator.board.lookup(_endpoint(request), request.match_info["job_id"])
    if job is None:
        return _error(404, "job not found")
    if job.status not in (FAILED, TIMED_OUT):
        return _error(400, f"job is {job.status}: only FAILED or TIMED_OUT jobs can be retried")
    emulator.board.retry(job)
    return web.json_response({"id": job.id, "status": job.status})


async def health_route(request: web.Request) -> web.Response:
    return web.json_response(_emulator(request).health())


async def purge_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    with emulator.limiter.admit(_endpoint(request), "purge-queue"):
        return web.json_response({"removed": emulator.board.purge_queue(_endpoint(request)), "status": "completed"})


# ------------------------------------------------------------------------------------ /_emulator


async def stats_route(request: web.Request) -> web.Response:
    return web.json_response(_emulator(request).stats())


async def jobs_route(request: web.Request) -> web.Response:
    jobs = sorted(_emulator(request).board.jobs.values(), key=lambda job: job.received_at)
    return web.json_response([job.record() for job in jobs])


async def reset_route(request: web.Request) -> web.Response:
    _emulator(request).reset()
    return web.json_response({"ok": True})


async def faults_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    if request.method == "POST":
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("faults must be a JSON object")
            emulator.faults.update(changes)
        except ValueError as exc:
            return _error(400, str(exc))
    return web.json_response(asdict(emulator.faults))


async def faults_clear_route(request: web.Request) -> web.Response:
    emulator = _emulator(request)
    emulator.set_faults(Faults())
    return web.json_response(asdict(emulator.faults))


async def config_route(request: web.Request) -> web.Response:
    """GET: the settings and limits. POST {"limits": {"run": {"requests", "per_seconds",
    "concurrent"}}, "<setting>": value, ...}: change them (all or nothing)."""
    emulator = _emulator(request)
    if request.method == "POST":
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("config must be a JSON object")
            changes = dict(changes)
            limits = changes.pop("limits", {})
            # Validated on copies first: a bad request changes nothing.
            dataclasses.replace(emulator.config).update(changes)
            Limiter(emulator.limiter.limits).update(limits)
            emulator.config.update(changes)
            emulator.limiter.update(limits)
        except ValueError as exc:
            return _error(400, str(exc))
    return web.json_response({**emulator.config.public(), "limits": emulator.limiter.public()})


async def workers_route(request: web.Request) -> web.Response:
    pool = _emulator(request).pool
    return web.json_response(pool.describe() if pool else [])


async def worker_signal_route(request: web.Request) -> web.Response:
    """POST {"signal": "SIGTERM" | "SIGKILL" | "SIGINT"}: SIGTERM is RunPod scaling the worker down
    (it gets no more jobs and finishes those it holds); SIGKILL is a crash."""
    pool = _emulator(request).pool
    try:
        body = await request.json()
    except json.JSONDecodeError:
        body = None
    signame = body.get("signal") if isinstance(body, dict) else None
    if signame not in ("SIGTERM", "SIGKILL", "SIGINT"):
        return _error(400, "signal must be SIGTERM, SIGKILL or SIGINT")
    if pool is None or not pool.signal(request.match_info["pod"], signame):
        return _error(404, "no such running worker process")
    return web.json_response({"ok": True})


def create_app(emulator: Emulator) -> web.Application:
    # Large enough to read an oversized body and answer RunPod's 400, not aiohttp's bare 413.
    app = web.Application(middlewares=[api_middleware], client_max_size=2 * RUNSYNC_LIMIT_BYTES)
    app[EMULATOR_KEY] = emulator
    prefix = "/v2/{endpoint}"
    app.router.add_post(f"{prefix}/run", run_route)
    app.router.add_post(f"{prefix}/runsync", runsync_route)
    app.router.add_get(f"{prefix}/status/{{job_id}}", status_route)
    app.router.add_post(f"{prefix}/status/{{job_id}}", status_route)
    app.router.add_get(f"{prefix}/stream/{{job_id}}", stream_route)
    app.router.add_post(f"{prefix}/stream/{{job_id}}", stream_route)
    app.router.add_post(f"{prefix}/cancel/{{job_id}}", cancel_route)
    app.router.add_post(f"{prefix}/retry/{{job_id}}", retry_route)
    app.router.add_get(f"{prefix}/health", health_route)
    app.router.add_post(f"{prefix}/purge-queue", purge_route)
    worker_api.add_routes(app)
    app.router.add_get("/_emulator/stats", stats_route)
    app.router.add_get("/_emulator/jobs", jobs_route)
    app.router.add_post("/_emulator/reset", reset_route)
    app.router.add_get("/_emulator/faults", faults_route)
    app.router.add_post("/_emulator/faults", faults_route)
    app.router.add_post("/_emulator/faults/clear", faults_clear_route)
    app.router.add_get("/_emulator/config", config_route)
    app.router.add_post("/_emulator/config", config_route)
    app.router.add_get("/_emulator/workers", workers_route)
    app.router.add_post("/_emulator/workers/{pod}/signal", worker_signal_route)

    async def on_startup(_: web.Application) -> None:
        await emulator.start()

    async def on_cleanup(_: web.Application) -> None:
        await emulator.stop()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
