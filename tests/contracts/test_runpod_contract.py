"""The RunPod emulator as the real runpod client SDK sees it: runpod.Endpoint (requests) and
runpod.AsyncioEndpoint (aiohttp), pointed at the emulator by `runpod.endpoint_url_base` (what
RUNPOD_ENDPOINT_BASE_URL sets) with `runpod.api_key`, against a handler run by the real worker SDK.

Each test names, in its docstring, the documented behaviour it holds the emulator to
(https://docs.runpod.io/serverless/endpoints/job-operations, .../references/operations, the
runpod-python sources under runpod/endpoint/); docs/emulators_runpod.md lists them.
"""

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import runpod
from runpod.endpoint.helpers import UNAUTHORIZED_MSG

from deploy.processes import scratch_dir
from tests.test_runpod_emulator import API_KEY, HANDLER, WORKERS_READY_WITHIN, RunPodEmu, start_emulator

ENDPOINT = "contract-endpoint"
OUTPUT_WITHIN = 30  # seconds Job.output() may poll (it checks once a second)


def _get(url: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, b"", method="POST"), timeout=10) as resp:
        return json.loads(resp.read())


def _until(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what}")


@pytest.fixture(scope="module")
def emu() -> Iterator[RunPodEmu]:
    workdir = scratch_dir("bunch-runpod-contract-")
    (workdir / "handler.py").write_text(HANDLER)
    emu = start_emulator(workdir, "runpod-contract", "--workers", "1", "--handler", str(workdir / "handler.py"))
    try:
        health = f"{emu.base}/{ENDPOINT}/health"
        _until(lambda: _get(health)["workers"]["idle"] == 1, WORKERS_READY_WITHIN, "the worker ready")
        yield emu
    finally:
        emu.process.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(autouse=True)
def sdk(emu: RunPodEmu) -> Iterator[None]:
    """The SDK's documented configuration, restored afterwards: other tests may use the module too."""
    saved = runpod.api_key, runpod.endpoint_url_base
    runpod.api_key, runpod.endpoint_url_base = API_KEY, emu.base
    _post(f"{emu.url}/_emulator/reset")
    yield
    runpod.api_key, runpod.endpoint_url_base = saved


def _wait_running(job: runpod.endpoint.runner.Job) -> None:
    _until(lambda: job.status() == "IN_PROGRESS", OUTPUT_WITHIN, f"{job.job_id} running")


def _wait_status(emu: RunPodEmu, job_id: str, status: str) -> None:
    url = f"{emu.base}/{ENDPOINT}/status/{job_id}"
    _until(lambda: _get(url)["status"] == status, OUTPUT_WITHIN, f"{job_id} {status}")


# ------------------------------------------------------------------------------------ runpod.Endpoint


def test_run_then_status_then_output() -> None:
    """/run answers {"id", "status": "IN_QUEUE"}; /status answers the job's status and, once it is
    COMPLETED, the handler's return value as `output` (job-operations: "Submit asynchronous jobs",
    "Check job status")."""
    job = runpod.Endpoint(ENDPOINT).run({"prompt": "a cat"})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=OUTPUT_WITHIN) == {"echo": {"prompt": "a cat"}, "job_id": job.job_id}
    assert job.status() == "COMPLETED"


def test_run_sync_answers_the_output() -> None:
    """/runsync holds the request until the job ends and answers the /status body, output included
    (job-operations: "Submit synchronous jobs")."""
    output = runpod.Endpoint(ENDPOINT).run_sync({"prompt": "a dog"}, timeout=OUTPUT_WITHIN)
    assert output["echo"] == {"prompt": "a dog"}


def test_cancel_a_running_job() -> None:
    """/cancel/{id} stops a queued or running job and answers {"id", "status": "CANCELLED"}; /status
    then says CANCELLED (job-operations: "Cancel a job"; job-states: CANCELLED)."""
    job = runpod.Endpoint(ENDPOINT).run({"sleep": 30})
    _wait_running(job)
    assert job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
    assert job.status() == "CANCELLED"


def test_failed_job_carries_the_handler_error() -> None:
    """A handler that raises makes the job FAILED, with `error` the JSON string runpod-python's
    rp_job.run_job builds (error_type, error_message, error_traceback, hostname, worker_id,
    runpod_version) and no output (job-states: FAILED)."""
    job = runpod.Endpoint(ENDPOINT).run({"boom": "kaboom"})
    assert job.output(timeout=OUTPUT_WITHIN) is None
    assert job.status() == "FAILED"
    body = job.rp_client.get(f"{ENDPOINT}/status/{job.job_id}")
    error = json.loads(body["error"])
    assert error["error_type"] == "<class 'RuntimeError'>" and error["error_message"] == "kaboom"
    assert error["worker_id"] == body["workerId"]


def test_health_reports_jobs_and_workers() -> None:
    """/health answers {"jobs": {completed, failed, inProgress, inQueue, retried}, "workers": {idle,
    initializing, ready, running, throttled, unhealthy}} (job-operations: "Check endpoint health")."""
    endpoint = runpod.Endpoint(ENDPOINT)
    endpoint.run_sync({}, timeout=OUTPUT_WITHIN)
    health = endpoint.health()
    assert health["jobs"] == {"completed": 1, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}
    assert health["workers"] == {
        "idle": 1, "initializing": 0, "ready": 1, "running": 0, "throttled": 0, "unhealthy": 0,
    }  # fmt: skip


def test_purge_queue_removes_waiting_jobs_only() -> None:
    """/purge-queue removes every job still IN_QUEUE and leaves running ones alone, answering
    {"removed": n, "status": "completed"} (job-operations: "Purge the queue")."""
    endpoint = runpod.Endpoint(ENDPOINT)
    running = [endpoint.run({"sleep": 30}) for _ in range(3)]  # the worker holds 3
    for job in running:
        _wait_running(job)
    waiting = [endpoint.run({}) for _ in range(2)]
    assert endpoint.purge_queue() == {"removed": 2, "status": "completed"}
    assert [job.status() for job in running] == ["IN_PROGRESS"] * 3
    for job in waiting:
        with pytest.raises(Exception, match="404"):
            job.status()
    for job in running:
        job.cancel()


def test_a_wrong_key_is_unauthorized() -> None:
    """Every call needs `Authorization: Bearer <API key>`; a wrong key gets 401, which the SDK
    turns into its RuntimeError (runpod/endpoint/runner.py: RunPodClient._request)."""
    with pytest.raises(RuntimeError, match=UNAUTHORIZED_MSG.split("|")[0].strip()):
        runpod.Endpoint(ENDPOINT, api_key="wrong-key").run({})


def test_policy_out_of_bounds_is_an_http_error() -> None:
    """executionTimeout must lie between 5 s and 7 days (job-operations: "Execution policies");
    the SDK raises the 400 as requests' HTTPError."""
    with pytest.raises(Exception, match="400"):
        runpod.Endpoint(ENDPOINT).run({"input": {"x": 1}, "policy": {"executionTimeout": 1000}})


# ------------------------------------------------------------------------------------ runpod.AsyncioEndpoint


async def test_asyncio_run_status_output_and_health() -> None:
    """The same /run, /status and /health through AsyncioEndpoint and AsyncioJob
    (runpod/endpoint/asyncio/asyncio_runner.py)."""
    async with aiohttp.ClientSession() as session:
        endpoint = runpod.AsyncioEndpoint(ENDPOINT, session)
        job = await endpoint.run({"prompt": "a fox"})
        assert await job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        assert await job.output(timeout=OUTPUT_WITHIN) == {"echo": {"prompt": "a fox"}, "job_id": job.job_id}
        assert await job.status() == "COMPLETED"
        assert (await endpoint.health())["jobs"]["completed"] == 1


async def test_asyncio_cancel_and_purge(emu: RunPodEmu) -> None:
    """/cancel through AsyncioJob.cancel and /purge-queue through AsyncioEndpoint.purge_queue."""
    async with aiohttp.ClientSession() as session:
        endpoint = runpod.AsyncioEndpoint(ENDPOINT, session)
        running = [await endpoint.run({"sleep": 30}) for _ in range(3)]
        for job in running:
            _wait_status(emu, job.job_id, "IN_PROGRESS")
        await endpoint.run({})
        assert await endpoint.purge_queue() == {"removed": 1, "status": "completed"}
        for job in running:
            assert await job.cancel() == {"id": job.job_id, "status": "CANCELLED"}
        assert [await job.status() for job in running] == ["CANCELLED"] * 3


async def test_asyncio_run_wraps_everything_in_input(emu: RunPodEmu) -> None:
    """AsyncioEndpoint.run posts {"input": <its argument>}: a webhook or policy passed to it ends up
    inside the input and never reaches RunPod, which is why Bunch's dispatcher calls the REST API
    itself (runpod/endpoint/asyncio/asyncio_runner.py: Endpoint.run)."""
    async with aiohttp.ClientSession() as session:
        job = await runpod.AsyncioEndpoint(ENDPOINT, session).run({"input": {"x": 1}, "webhook": "http://hook"})
        await job.output(timeout=OUTPUT_WITHIN)
    (record,) = _get(f"{emu.url}/_emulator/jobs")
    assert record["input"] == {"input": {"x": 1}, "webhook": "http://hook"}
    assert record["webhook"] is None
