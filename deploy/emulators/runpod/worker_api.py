"""The job API RunPod serves to its workers, as runpod-python 1.12 calls it.

- job-take/{pod} and job-take-batch/{pod}?batch_size=N (rp_job.get_job / _job_get_url): a long poll;
  one job as an object {"id", "input"}, a batch as a list of at most N, or 204 when none came.
- job-done/{pod}/{job}?isStream=false (rp_http.send_result / _transmit): the body is the JSON of
  rp_job.run_job's result sent as application/x-www-form-urlencoded, not form fields, so the raw body
  is parsed as JSON. 200 always: a late answer for a job already ended is dropped, not refused (the
  SDK would retry a refusal three times, FibonacciRetry).
- job-stream/{pod}/{job} (rp_http.stream_result): a generator handler's partial outputs.
- ping/{pod}?job_id=...&runpod_version=... (rp_ping.Heartbeat._send_ping), and
  ping/{pod}?status=unhealthy&check=...&reason=... (rp_fitness._report_unhealthy).
- job-stop/{pod} (rp_job._job_stop_url / get_stop_signals): a long poll answering
  {"jobsToStop": [ids]} for cancelled, timed-out or expired jobs, or 204.

Every call carries `Authorization: <RUNPOD_AI_API_KEY>`, the bare key (runpod.http_client.get_auth_header,
rp_ping.Heartbeat); a wrong one gets 401. Note the SDK prefers the key of a ~/.runpod/config.toml
over RUNPOD_AI_API_KEY when that file exists.
"""

import json
import logging
import time
from typing import Any

from aiohttp import web

from deploy.emulators.runpod.emulator import EMULATOR_KEY, Emulator
from deploy.emulators.runpod.jobs import Seat

log = logging.getLogger("emulator.runpod")

WORKER_OPS = frozenset({"job-take", "job-take-batch", "job-done", "job-stream", "ping", "job-stop"})


def worker_authorized(request: web.Request, worker_key: str) -> bool:
    return request.headers.get("Authorization", "") == worker_key


def _seat(request: web.Request, alive: bool = True) -> Seat:
    emulator: Emulator = request.app[EMULATOR_KEY]
    pod_id = request.match_info["pod"]
    seat = emulator.board.seats.get(pod_id)
    if seat is None:
        raise web.HTTPNotFound(text=f"unknown worker {pod_id}")
    if alive and seat.seen_at is None:
        seat.seen_at = time.time()  # its first call: it is done starting
    return seat


async def job_take(request: web.Request) -> web.StreamResponse:
    emulator = request.app[EMULATOR_KEY]
    seat = _seat(request)
    batch = request.match_info["op"] == "job-take-batch"
    wanted = 1
    if batch:
        try:
            wanted = int(request.query["batch_size"])
        except (KeyError, ValueError):
            return web.json_response({"error": "batch_size must be an integer"}, status=400)
        if wanted < 1:
            return web.json_response({"error": "batch_size must be at least 1"}, status=400)
    jobs = await emulator.board.take(seat, wanted, emulator.config.long_poll_seconds)
    if not jobs:
        return web.Response(status=204)
    bodies = [{"id": job.id, "input": job.input} for job in jobs]
    return web.json_response(bodies if batch else bodies[0])


async def job_done(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    seat = _seat(request)
    result = _json_object(await request.read())
    if result is None:
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    if result.pop("stopPod", False):
        emulator.note_refresh(seat.pod_id)
    emulator.board.report(seat, request.match_info["job_id"], result)
    return web.Response(status=200)


async def job_stream(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    seat = _seat(request)
    partial = _json_object(await request.read())
    if partial is None:
        return web.json_response({"error": "body must be a JSON object"}, status=400)
    emulator.board.add_stream(seat, request.match_info["job_id"], partial)
    return web.Response(status=200)


async def ping(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    unhealthy = request.query.get("status") == "unhealthy"
    seat = _seat(request, alive=not unhealthy)
    seat.last_ping = dict(request.query)
    if unhealthy:
        reason = f"fitness check {request.query.get('check', '?')} failed: {request.query.get('reason', '')}"
        emulator.note_unhealthy(seat.pod_id, reason)
    elif running := request.query.get("job_id"):
        emulator.board.reconcile(seat, running.split(","))
    return web.Response(status=200)


async def job_stop(request: web.Request) -> web.Response:
    emulator = request.app[EMULATOR_KEY]
    seat = _seat(request)
    stops = await seat.collect_stops(emulator.config.long_poll_seconds)
    if not stops:
        return web.Response(status=204)
    return web.json_response({"jobsToStop": stops})


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def add_routes(app: web.Application) -> None:
    prefix = "/v2/{endpoint}"
    app.router.add_get(prefix + "/{op:job-take|job-take-batch}/{pod}", job_take)
    app.router.add_post(prefix + "/job-done/{pod}/{job_id}", job_done)
    app.router.add_post(prefix + "/job-stream/{pod}/{job_id}", job_stream)
    app.router.add_get(prefix + "/ping/{pod}", ping)
    app.router.add_get(prefix + "/job-stop/{pod}", job_stop)
