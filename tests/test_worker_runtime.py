"""A handler under the real runpod SDK runtime (runpod.serverless.start), fed by the RunPod emulator.

The handler is written here: async, concurrency_modifier 3, it sleeps, raises, returns {"error": ...}
or refresh_worker on demand, and leaves a file per event (started, cancelled, finished) so the test
sees what happened inside the worker, not only what the emulator was told.
"""

import json
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy.processes import scratch_dir
from tests.test_runpod_emulator import (
    API_KEY,
    AUTH,
    ENDPOINT,
    RunPodEmu,
    admin,
    health,
    poll,
    start_emulator,
    wait_workers,
)

HANDLER = """
import asyncio
import os
import time
from pathlib import Path

import runpod

EVENTS = Path(os.environ["EVENTS_DIR"])


def note(job, event):
    # Written aside and renamed: the test never reads half a timestamp.
    path = EVENTS / f"{job['id']}.{event}"
    path.with_suffix(".tmp").write_text(str(time.time()))
    path.with_suffix(".tmp").rename(path)


async def handler(job):
    data = job["input"]
    note(job, "started")
    try:
        await asyncio.sleep(float(data.get("sleep", 0)))
    except asyncio.CancelledError:
        note(job, "cancelled")
        raise
    note(job, "finished")
    if data.get("boom"):
        raise ValueError(data["boom"])
    if data.get("return_error"):
        return {"error": data["return_error"], "partial": 1}
    if data.get("refresh"):
        return {"done": True, "refresh_worker": True}
    return {"done": True}


def concurrency_modifier(current):
    return 3


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
"""

UNFIT_HANDLER = """
import runpod


@runpod.serverless.register_fitness_check
def gemini_key_present():
    raise RuntimeError("GEMINI_API_KEY is not set")


async def handler(job):
    return {"never": True}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
"""

BATCH = 5
BATCH_SLEEP = 1.0


@dataclass
class Runtime:
    emu: RunPodEmu
    events: Path
    batch: list[str]  # jobs queued before the worker started


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = scratch_dir("bunch-worker-runtime-")
    (path / "handler.py").write_text(HANDLER)
    (path / "unfit.py").write_text(UNFIT_HANDLER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _emulator(workdir: Path, name: str, handler: str, workers: int = 1) -> tuple[RunPodEmu, Path]:
    events = workdir / f"{name}-events"
    events.mkdir()
    emu = start_emulator(
        workdir, name, "--workers", str(workers), "--handler", str(workdir / handler),
        "--min-execution-timeout-ms", "100", "--min-ttl-ms", "100", "--long-poll-seconds", "10",
        env={"EVENTS_DIR": str(events)},
    )  # fmt: skip
    return emu, events


def _run(http: aiohttp.ClientSession, emu: RunPodEmu, job_input: dict[str, Any], **extra: Any) -> Any:
    return http.post(f"{emu.base}/{ENDPOINT}/run", json={"input": job_input, **extra}, headers=AUTH)


def _run_now(emu: RunPodEmu, job_input: dict[str, Any]) -> str:
    request = urllib.request.Request(
        f"{emu.base}/{ENDPOINT}/run", json.dumps({"input": job_input}).encode(), {**AUTH}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return str(json.loads(resp.read())["id"])


async def run(http: aiohttp.ClientSession, emu: RunPodEmu, job_input: dict[str, Any], **extra: Any) -> str:
    async with _run(http, emu, job_input, **extra) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["id"])


async def status(http: aiohttp.ClientSession, emu: RunPodEmu, job_id: str) -> dict[str, Any] | None:
    async with http.get(f"{emu.base}/{ENDPOINT}/status/{job_id}", headers=AUTH) as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200
        return dict(await resp.json())


async def wait_status(
    http: aiohttp.ClientSession, emu: RunPodEmu, job_id: str, *wanted: str, within: float = 10, every: float = 0.05
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = await status(http, emu, job_id)
        return body if body is not None and body["status"] in wanted else None

    result: dict[str, Any] = await poll(reached, within, f"{job_id} in {wanted}", every=every)
    return result


async def wait_event(events: Path, job_id: str, event: str, within: float = 10) -> float:
    async def seen() -> float | None:
        path = events / f"{job_id}.{event}"
        return float(path.read_text()) if path.exists() and path.read_text() else None

    result: float = await poll(seen, within, f"{job_id} {event} in the handler")
    return result


@pytest.fixture(scope="module")
def runtime(workdir: Path) -> Iterator[Runtime]:
    """One worker process; BATCH jobs are queued before it has even imported the SDK."""
    emu, events = _emulator(workdir, "runtime", "handler.py")

    try:
        batch = [_run_now(emu, {"sleep": BATCH_SLEEP, "n": n}) for n in range(BATCH)]
        yield Runtime(emu, events, batch)
    finally:
        emu.process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_one_worker_takes_a_batch_of_three_and_never_holds_four(
    http: aiohttp.ClientSession, runtime: Runtime
) -> None:
    for job_id in runtime.batch:
        body = await wait_status(http, runtime.emu, job_id, "COMPLETED", within=60)
        assert body["output"] == {"done": True}
    worker = (await admin(http, runtime.emu, "workers"))[0]  # the first worker, before any refresh
    # rp_scale.JobScaler.get_jobs asked for its 3 free slots in one job-take-batch and got 3.
    assert worker["takes"][0] == 3
    assert worker["max_held"] == 3
    # Inside the handler too: never more than 3 of the batch running at once.
    spans = [
        (float((runtime.events / f"{j}.started").read_text()), float((runtime.events / f"{j}.finished").read_text()))
        for j in runtime.batch
    ]
    overlap = max(sum(1 for start, end in spans if start <= at < end) for at, _ in spans)
    assert overlap == 3


async def test_cancel_raises_cancelled_error_in_the_handler(http: aiohttp.ClientSession, runtime: Runtime) -> None:
    job_id = await run(http, runtime.emu, {"sleep": 30})
    await wait_event(runtime.events, job_id, "started", within=60)
    async with http.post(f"{runtime.emu.base}/{ENDPOINT}/cancel/{job_id}", headers=AUTH) as resp:
        assert await resp.json() == {"id": job_id, "status": "CANCELLED"}
    await wait_event(runtime.events, job_id, "cancelled")
    assert not (runtime.events / f"{job_id}.finished").exists()
    assert (await status(http, runtime.emu, job_id) or {})["status"] == "CANCELLED"


async def test_cancel_right_after_the_take_still_reaches_the_handler(
    http: aiohttp.ClientSession, runtime: Runtime
) -> None:
    # IN_PROGRESS is set when the worker takes the job, before the SDK has started its task: a stop
    # signal then finds nothing to cancel, and the worker's heartbeat brings it back.
    await wait_workers(http, runtime.emu, 1)  # long-polling job-take: it takes the job at once
    job_id = await run(http, runtime.emu, {"sleep": 30})
    await wait_status(http, runtime.emu, job_id, "IN_PROGRESS", every=0.002)
    async with http.post(f"{runtime.emu.base}/{ENDPOINT}/cancel/{job_id}", headers=AUTH) as resp:
        assert (await resp.json())["status"] == "CANCELLED"
    await wait_event(runtime.events, job_id, "cancelled")


async def test_execution_timeout_stops_the_handler(http: aiohttp.ClientSession, runtime: Runtime) -> None:
    job_id = await run(http, runtime.emu, {"sleep": 30}, policy={"executionTimeout": 1000})
    started = await wait_event(runtime.events, job_id, "started", within=60)
    body = await wait_status(http, runtime.emu, job_id, "TIMED_OUT")
    stopped = await wait_event(runtime.events, job_id, "cancelled")
    # The emulator's clock starts at the take, a little before the handler's.
    assert 0.5 <= stopped - started < 4.0
    assert body["executionTime"] >= 1000


async def test_ttl_stops_a_running_job_and_deletes_it(http: aiohttp.ClientSession, runtime: Runtime) -> None:
    job_id = await run(http, runtime.emu, {"sleep": 30}, policy={"executionTimeout": 60_000, "ttl": 1500})
    await wait_event(runtime.events, job_id, "started", within=60)
    await wait_event(runtime.events, job_id, "cancelled")

    async def gone() -> bool:
        return await status(http, runtime.emu, job_id) is None

    await poll(gone, 5, "the job deleted at its ttl")


async def test_errors_as_runpod_reports_them(http: aiohttp.ClientSession, runtime: Runtime) -> None:
    raised = await run(http, runtime.emu, {"boom": "no such model"})
    returned = await run(http, runtime.emu, {"return_error": "bad prompt"})
    body = await wait_status(http, runtime.emu, raised, "FAILED", within=60)
    # rp_job.run_job: a JSON string of the exception, from the worker that ran it.
    error = json.loads(body["error"])
    assert error["error_type"] == "<class 'ValueError'>" and error["error_message"] == "no such model"
    assert error["worker_id"] == body["workerId"] and error["hostname"] == f"{body['workerId']}-emulator"
    assert error["runpod_version"] == "1.12.0" and "Traceback" in error["error_traceback"]
    assert "output" not in body
    body = await wait_status(http, runtime.emu, returned, "FAILED")
    assert body["error"] == "bad prompt" and body["output"] == {"partial": 1}


async def test_refresh_worker_is_removed_from_the_output_and_replaces_the_worker(
    http: aiohttp.ClientSession, runtime: Runtime
) -> None:
    before = {w["pod_id"] for w in await admin(http, runtime.emu, "workers") if w["state"] != "stopped"}
    job_id = await run(http, runtime.emu, {"refresh": True})
    body = await wait_status(http, runtime.emu, job_id, "COMPLETED", within=60)
    assert body["output"] == {"done": True}

    async def replaced() -> list[dict[str, Any]] | None:
        workers = await admin(http, runtime.emu, "workers")
        fresh = [w for w in workers if w["pod_id"] not in before and w["state"] == "idle"]
        return workers if fresh else None

    workers = await poll(replaced, 60, "a fresh worker after refresh_worker", every=0.1)
    old = [w for w in workers if w["pod_id"] in before]
    assert [(w["state"], w["exit_code"]) for w in old] == [("stopped", 0)]
    assert (await health(http, runtime.emu))["workers"]["unhealthy"] == 0
    # The fresh worker serves the endpoint.
    after = await run(http, runtime.emu, {})
    assert (await wait_status(http, runtime.emu, after, "COMPLETED", within=30))["workerId"] not in before


def _environ(pid: int) -> dict[bytes, bytes]:
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split(b"=", 1) for item in environ.split(b"\0") if b"=" in item)


def _pod_processes(pod_id: str) -> list[int]:
    marker = f"RUNPOD_POD_ID={pod_id}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as env:
                    if marker in env.read().split(b"\0"):
                        pids.append(int(entry.name))
            except OSError:
                continue
    return pids


async def test_sigterm_lets_in_flight_jobs_finish(http: aiohttp.ClientSession, workdir: Path) -> None:
    emu, events = _emulator(workdir, "sigterm", "handler.py", workers=2)
    try:
        await wait_workers(http, emu, 2)
        job_id = await run(http, emu, {"sleep": 2})
        await wait_event(events, job_id, "started")
        pod = (await status(http, emu, job_id) or {})["workerId"]
        # RunPod scaling the worker down: SIGTERM, and no new job for it.
        await admin(http, emu, f"workers/{pod}/signal", {"signal": "SIGTERM"})
        later = await run(http, emu, {})
        assert (await wait_status(http, emu, later, "COMPLETED"))["workerId"] != pod
        assert (await wait_status(http, emu, job_id, "COMPLETED"))["output"] == {"done": True}

        async def exited() -> dict[str, Any] | None:
            worker = next(w for w in await admin(http, emu, "workers") if w["pod_id"] == pod)
            return worker if worker["exit_code"] is not None else None

        worker = await poll(exited, 10, "the worker exiting after its job")
        assert worker["state"] == "stopped" and worker["exit_code"] == 0
        assert (await health(http, emu))["workers"]["unhealthy"] == 0
        assert _pod_processes(pod) == []  # its heartbeat process went with it

        # Stopping the emulator: its workers get SIGTERM too, finish what they run, and go.
        last = await run(http, emu, {"sleep": 1})
        await wait_event(events, last, "started")
        other = (await status(http, emu, last) or {})["workerId"]
        emu.process.stop()
        assert (events / f"{last}.finished").exists()
        assert _pod_processes(other) == []
    finally:
        emu.process.stop()


async def test_a_failed_fitness_check_keeps_the_worker_from_taking_jobs(
    http: aiohttp.ClientSession, workdir: Path
) -> None:
    emu, _ = _emulator(workdir, "unfit", "unfit.py")
    try:
        job_id = await run(http, emu, {})

        async def unhealthy() -> dict[str, Any] | None:
            report = await health(http, emu)
            return report if report["workers"]["unhealthy"] == 1 else None

        report = await poll(unhealthy, 60, "the worker unhealthy", every=0.1)
        assert report["workers"] | {"unhealthy": 0} == dict.fromkeys(report["workers"], 0)
        assert report["jobs"]["inQueue"] == 1
        (worker,) = await admin(http, emu, "workers")
        # rp_fitness: os._exit(1), after reporting the failed check on the ping URL.
        assert worker["exit_code"] == 1
        assert worker["unhealthy_reason"] == (
            "fitness check gemini_key_present failed: RuntimeError: GEMINI_API_KEY is not set"
        )
        assert (await status(http, emu, job_id) or {})["status"] == "IN_QUEUE"
    finally:
        emu.process.stop()


async def test_the_worker_key_is_not_the_api_key(http: aiohttp.ClientSession, runtime: Runtime) -> None:
    worker = next(w for w in await admin(http, runtime.emu, "workers") if w["state"] != "stopped")
    pid = worker["pid"]
    variables = _environ(pid)
    key = variables[b"RUNPOD_AI_API_KEY"].decode()
    assert key and key != API_KEY
    assert variables[b"RUNPOD_WEBHOOK_GET_JOB"].decode().endswith("/v2/local/job-take/$ID?gpu=emulator")
    ping = f"{runtime.emu.base}/local/ping/{worker['pod_id']}?gpu=emulator"
    async with http.get(ping, headers={"Authorization": key}) as resp:
        assert resp.status == 200
    async with http.get(ping, headers=AUTH) as resp:
        assert resp.status == 401
