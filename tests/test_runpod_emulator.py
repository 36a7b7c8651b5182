"""The RunPod emulator as a real subprocess, driven through the production RunPodClient and raw HTTP.

Two instances: one runs a small handler written here under the real runpod SDK (one worker process
holding 3 jobs, the policy minimums lowered so timeouts take a second), one runs `--sleep-ms`
in-process workers with RunPod's own bounds. A webhook receiver in the test process records what
the emulator POSTs back. The runtime itself (batches, stop signals, SIGTERM, fitness checks) is
tests/test_worker_runtime.py; the runpod client SDK against the emulator is tests/contracts/.
"""

import asyncio
import contextlib
import itertools
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from deploy.emulators.runpod import call_handler
from deploy.processes import Process, base_env, free_port, python, scratch_dir, wait_http
from services.dispatcher.runpod_client import RunPodClient, RunPodError, parse_retry_after

API_KEY = "emulator-test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ENDPOINT = "test-endpoint"
WEBHOOK_RETRY_DELAY = 0.2
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
WORKERS_READY_WITHIN = 60.0  # a worker process imports the runpod SDK first (~2 s, more on a busy box)

HANDLER = """
import asyncio

import runpod


async def handler(job):
    data = job["input"]
    await asyncio.sleep(float(data.get("sleep", 0)))
    if data.get("boom"):
        raise RuntimeError(data["boom"])
    if data.get("return_error"):
        return {"error": data["return_error"], "partial": 1}
    return {"echo": data, "job_id": job["id"]}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: 3})
"""


@dataclass
class RunPodEmu:
    url: str
    process: Process

    @property
    def base(self) -> str:
        return f"{self.url}/v2"


def start_emulator(workdir: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> RunPodEmu:
    """The emulator as a process on a free port, answering once its HTTP API is up (worker
    processes may still be importing the SDK: see wait_workers)."""
    port = free_port()
    args = python(
        "-m", "deploy.emulators.runpod", "--host", "127.0.0.1", "--port", str(port),
        "--api-key", API_KEY, *extra,
    )  # fmt: skip
    proc = Process(name, args, base_env(env), workdir / f"{name}.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_emulator/stats", proc, timeout=15)
    except Exception:
        proc.stop()
        raise
    return RunPodEmu(url, proc)


async def poll(check: Callable[[], Awaitable[Any]], within: float, what: str, every: float = 0.05) -> Any:
    """The first truthy value of `check`, polled until the deadline."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := await check():
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"not within {within}s: {what}")


async def admin(http: aiohttp.ClientSession, emu: RunPodEmu, path: str, body: Any = None) -> Any:
    method = "GET" if body is None and path in ("stats", "jobs", "faults", "config", "workers") else "POST"
    async with http.request(method, f"{emu.url}/_emulator/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def health(http: aiohttp.ClientSession, emu: RunPodEmu) -> dict[str, Any]:
    async with http.get(f"{emu.base}/{ENDPOINT}/health", headers=AUTH) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def wait_workers(http: aiohttp.ClientSession, emu: RunPodEmu, idle: int) -> None:
    async def ready() -> bool:
        return (await health(http, emu))["workers"]["idle"] >= idle

    await poll(ready, WORKERS_READY_WITHIN, f"{idle} idle workers", every=0.1)


@pytest.fixture(scope="module")
def emu_dir() -> Iterator[Path]:
    path = scratch_dir("bunch-runpod-emu-")
    (path / "handler.py").write_text(HANDLER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def handler_emu(emu_dir: Path) -> Iterator[RunPodEmu]:
    emu = start_emulator(
        emu_dir, "runpod-handler", "--workers", "1", "--handler", str(emu_dir / "handler.py"),
        "--webhook-retry-delay", str(WEBHOOK_RETRY_DELAY),
        "--min-execution-timeout-ms", "100", "--min-ttl-ms", "100",
    )  # fmt: skip
    yield emu
    emu.process.stop()


@pytest.fixture(scope="module")
def sleep_emu(emu_dir: Path) -> Iterator[RunPodEmu]:
    emu = start_emulator(
        emu_dir, "runpod-sleep", "--workers", "3", "--sleep-ms", "300", "--full-sleep-ms", "0",
        "--result-ttl-seconds", "1.5",
    )  # fmt: skip
    yield emu
    emu.process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _clean(http: aiohttp.ClientSession, emu: RunPodEmu) -> None:
    await admin(http, emu, "reset")
    await admin(http, emu, "faults/clear")


def _client(http: aiohttp.ClientSession, emu: RunPodEmu, **kwargs: Any) -> RunPodClient:
    options: dict[str, Any] = {"attempts": 5, "backoff_seconds": 0.02, "backoff_max_seconds": 0.1}
    options.update(kwargs)
    return RunPodClient(http, emu.base, ENDPOINT, options.pop("api_key", API_KEY), **options)


@pytest.fixture
async def client(http: aiohttp.ClientSession, handler_emu: RunPodEmu) -> RunPodClient:
    await _clean(http, handler_emu)
    await wait_workers(http, handler_emu, 1)
    return _client(http, handler_emu)


@pytest.fixture
async def sleep_client(http: aiohttp.ClientSession, sleep_emu: RunPodEmu) -> AsyncIterator[RunPodClient]:
    await _clean(http, sleep_emu)
    before = await admin(http, sleep_emu, "config")
    yield _client(http, sleep_emu)
    await admin(http, sleep_emu, "config", {"limits": before["limits"]})


class Receiver:
    """Records webhook deliveries; answers with queued statuses first, then `default`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.deliveries: list[tuple[float, dict[str, Any]]] = []
        self.answers: list[int] = []
        self.default = 200
        self._arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.deliveries.append((time.monotonic(), await request.json()))
        self._arrived.set()
        return web.Response(status=self.answers.pop(0) if self.answers else self.default)

    async def wait_for(self, count: int, within: float = 5.0) -> list[dict[str, Any]]:
        """All deliveries so far, once there are `count` (or `within` seconds passed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.deliveries) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        return [body for _, body in self.deliveries]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    token = uuid.uuid4().hex
    hooks = Receiver(f"http://127.0.0.1:{port}/hook/{token}")
    app = web.Application()
    app.router.add_post(f"/hook/{token}", hooks.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield hooks
    await runner.cleanup()


async def wait_final(client: RunPodClient, job_id: str, within: float = 10.0) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        body = await client.status(job_id)
        assert body is not None, f"{job_id} vanished"
        return body if body["status"] in FINAL else None

    result: dict[str, Any] = await poll(final, within, f"{job_id} final", every=0.03)
    return result


async def wait_status(client: RunPodClient, job_id: str, status: str, within: float = 5.0) -> None:
    async def reached() -> bool:
        body = await client.status(job_id)
        return body is not None and body["status"] == status

    await poll(reached, within, f"{job_id} {status}", every=0.02)


# ------------------------------------------------------------------------------------------ lifecycle


async def test_run_completes_with_output_and_webhook(client: RunPodClient, receiver: Receiver) -> None:
    job_input = {"sleep": 0.3, "prompt": "a cat"}
    job_id = await client.run(job_input, webhook=receiver.url)

    early = await client.status(job_id)
    assert early is not None and early["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert "output" not in early

    final = await wait_final(client, job_id)
    assert final["status"] == "COMPLETED"
    assert final["output"] == {"echo": job_input, "job_id": job_id}
    assert final["executionTime"] >= 250 and isinstance(final["delayTime"], int)
    assert final["workerId"].startswith("worker-0-")

    (hook,) = await receiver.wait_for(1)
    assert hook["id"] == job_id and hook["status"] == "COMPLETED"
    assert hook["output"] == final["output"]
    assert hook["input"] == job_input and hook["webhook"] == receiver.url


async def test_workers_cap_concurrency_exactly(
    http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient
) -> None:
    ids = await asyncio.gather(*(sleep_client.run({"n": n}) for n in range(10)))
    assert len(set(ids)) == 10

    async def all_done() -> dict[str, Any] | None:
        stats = await admin(http, sleep_emu, "stats")
        assert stats["in_progress"] <= 3
        return stats if stats["completed"] == 10 else None

    stats = await poll(all_done, 8, "10 jobs completed")
    assert stats["max_in_progress"] == 3
    assert stats["runs_received"] == 10
    body = await sleep_client.status(ids[-1])
    assert body is not None and body["output"] == {"images": []}


async def test_results_expire_after_ttl(sleep_client: RunPodClient) -> None:
    job_id = await sleep_client.run({})
    assert (await wait_final(sleep_client, job_id))["status"] == "COMPLETED"
    await asyncio.sleep(1.7)
    assert await sleep_client.status(job_id) is None


async def test_runsync_results_are_kept_one_minute_unless_configured(
    http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient
) -> None:
    config = await admin(http, sleep_emu, "config")
    assert config["runsync_result_ttl_seconds"] == 60 and config["result_ttl_seconds"] == 1.5
    await admin(http, sleep_emu, "config", {"runsync_result_ttl_seconds": 0.3})
    try:
        async with http.post(f"{sleep_emu.base}/{ENDPOINT}/runsync", json={"input": {}}, headers=AUTH) as resp:
            body = await resp.json()
        assert body["status"] == "COMPLETED"
        await asyncio.sleep(0.5)
        assert await sleep_client.status(body["id"]) is None
    finally:
        await admin(http, sleep_emu, "config", {"runsync_result_ttl_seconds": 60})


async def test_purge_queue_removes_only_waiting_jobs(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    running = [await client.run({"sleep": 5}) for _ in range(3)]  # the worker's 3 slots
    for job_id in running:
        await wait_status(client, job_id, "IN_PROGRESS")
    queued = [await client.run({}) for _ in range(2)]
    async with http.post(f"{handler_emu.base}/{ENDPOINT}/purge-queue", headers=AUTH) as resp:
        assert resp.status == 200
        assert await resp.json() == {"removed": 2, "status": "completed"}
    assert [await client.status(job_id) for job_id in queued] == [None, None]
    assert [(await client.status(job_id) or {})["status"] for job_id in running] == ["IN_PROGRESS"] * 3
    for job_id in running:
        await client.cancel(job_id)


async def test_handler_exception_fails_with_runpod_error(client: RunPodClient) -> None:
    final = await wait_final(client, await client.run({"boom": "kaboom"}))
    assert final["status"] == "FAILED"
    assert '"error_message": "kaboom"' in final["error"]
    assert "RuntimeError" in final["error"]


async def test_handler_returned_error_fails(client: RunPodClient) -> None:
    final = await wait_final(client, await client.run({"return_error": "bad prompt"}))
    assert final["status"] == "FAILED"
    assert final["error"] == "bad prompt"
    assert final["output"] == {"partial": 1}


async def test_retry_queues_a_failed_job_again(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    job_id = await client.run({"boom": "again", "sleep": 0.5})
    assert (await wait_final(client, job_id))["status"] == "FAILED"
    async with http.post(f"{handler_emu.base}/{ENDPOINT}/retry/{job_id}", headers=AUTH) as resp:
        assert resp.status == 200 and await resp.json() == {"id": job_id, "status": "IN_QUEUE"}
    assert "error" not in (await client.status(job_id) or {})  # the old result is gone at once
    assert (await wait_final(client, job_id))["status"] == "FAILED"
    assert (await health(http, handler_emu))["jobs"] == {
        "completed": 0, "failed": 2, "inProgress": 0, "inQueue": 0, "retried": 1,
    }  # fmt: skip
    done = await client.run({})
    await wait_final(client, done)
    async with http.post(f"{handler_emu.base}/{ENDPOINT}/retry/{done}", headers=AUTH) as resp:
        assert resp.status == 400 and "COMPLETED" in (await resp.json())["error"]


async def test_fail_next_runs(http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient) -> None:
    await admin(http, handler_emu, "faults", {"fail_next_runs": 2})
    ids = [await client.run({"n": n}) for n in range(3)]
    finals = [await wait_final(client, job_id) for job_id in ids]
    assert [f["status"] for f in finals] == ["FAILED", "FAILED", "COMPLETED"]
    assert finals[0]["error"] == "emulated worker failure"
    assert (await admin(http, handler_emu, "faults"))["fail_next_runs"] == 0


async def test_cancel_queued_and_running(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    blockers = [await client.run({"sleep": 5}) for _ in range(3)]
    for job_id in blockers:
        await wait_status(client, job_id, "IN_PROGRESS")
    queued = await client.run({"sleep": 0})
    assert (await client.status(queued) or {})["status"] == "IN_QUEUE"

    assert await client.cancel(queued) == {"id": queued, "status": "CANCELLED"}
    assert await client.cancel(blockers[0]) == {"id": blockers[0], "status": "CANCELLED"}
    records = {r["id"]: r for r in await admin(http, handler_emu, "jobs")}
    assert records[queued]["status"] == "CANCELLED" and records[queued]["started_at"] is None
    assert records[blockers[0]]["status"] == "CANCELLED"
    assert records[blockers[1]]["status"] == "IN_PROGRESS"
    stats = await admin(http, handler_emu, "stats")
    assert stats["cancelled"] == 2 and stats["cancel_calls"] == 2 and stats["in_progress"] == 2
    # The worker got the stop signal and freed the slot: a new job runs beside the two left.
    follower = await client.run({"sleep": 0})
    assert (await wait_final(client, follower))["status"] == "COMPLETED"
    for job_id in blockers[1:]:
        await client.cancel(job_id)


async def test_execution_timeout_times_out(client: RunPodClient) -> None:
    job_id = await client.run({"sleep": 5}, policy={"executionTimeout": 300})
    final = await wait_final(client, job_id)
    assert final["status"] == "TIMED_OUT"
    assert 250 <= final["executionTime"] < 2000


async def test_ttl_covers_execution_then_the_job_is_gone(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    job_id = await client.run({"sleep": 10}, policy={"executionTimeout": 20_000, "ttl": 1500})
    await wait_status(client, job_id, "IN_PROGRESS")

    async def gone() -> bool:
        return await client.status(job_id) is None

    await poll(gone, 4, "the job deleted at its ttl")
    stats = await admin(http, handler_emu, "stats")
    assert stats["expired"] == 1 and stats["in_progress"] == 0
    record = [r for r in await admin(http, handler_emu, "jobs") if r["id"] == job_id]
    assert record == []
    assert await client.cancel(job_id) is None


async def test_stuck_job_stays_in_progress_until_timeout(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    await admin(http, handler_emu, "faults", {"stuck_in_progress": 1})
    job_id = await client.run({"sleep": 0}, policy={"executionTimeout": 500})
    await wait_status(client, job_id, "IN_PROGRESS")
    assert (await wait_final(client, job_id))["status"] == "TIMED_OUT"
    record = {r["id"]: r for r in await admin(http, handler_emu, "jobs")}[job_id]
    # Never before the timeout the policy set, though the event loop's timers are millisecond-coarse.
    assert 0.5 <= record["finished_at"] - record["started_at"] < 1.5, record


async def test_unknown_id_is_none(client: RunPodClient) -> None:
    assert await client.status("no-such-job") is None
    assert await client.cancel("no-such-job") is None


async def test_expire_results_fault(http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient) -> None:
    job_id = await client.run({})
    await wait_final(client, job_id)
    await admin(http, handler_emu, "faults", {"expire_results": True})
    assert await client.status(job_id) is None
    await admin(http, handler_emu, "faults/clear")
    assert (await client.status(job_id) or {})["status"] == "COMPLETED"


async def test_runsync_waits_for_result(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    async with http.post(f"{handler_emu.base}/{ENDPOINT}/runsync", json={"input": {"x": 1}}, headers=AUTH) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "COMPLETED" and body["output"]["echo"] == {"x": 1}


# ------------------------------------------------------------------------------------------ RunPod's bounds


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"executionTimeout": 4999}, "policy.executionTimeout must be between 5000 and 604800000 ms"),
        ({"executionTimeout": 7 * 24 * 3600 * 1000 + 1}, "policy.executionTimeout must be between"),
        ({"ttl": 9999}, "policy.ttl must be between 10000 and 604800000 ms"),
        ({"ttl": 7 * 24 * 3600 * 1000 + 1}, "policy.ttl must be between"),
        ({"ttl": "10s"}, "policy.ttl must be a number of milliseconds"),
        ("fast", "policy must be an object"),
    ],
)
async def test_policy_out_of_bounds_is_refused(
    http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient, policy: Any, message: str
) -> None:
    body = {"input": {}, "policy": policy}
    async with http.post(f"{sleep_emu.base}/{ENDPOINT}/run", json=body, headers=AUTH) as resp:
        assert resp.status == 400
        assert message in (await resp.json())["error"]
    assert await admin(http, sleep_emu, "jobs") == []


async def test_policy_bounds_themselves_are_accepted(sleep_client: RunPodClient) -> None:
    for policy in ({"executionTimeout": 5000, "ttl": 10_000}, {"executionTimeout": 604_800_000, "ttl": 604_800_000}):
        assert (await wait_final(sleep_client, await sleep_client.run({}, policy=policy)))["status"] == "COMPLETED"


async def _post_statuses(http: aiohttp.ClientSession, url: str, times: int, body: Any = None) -> list[int]:
    statuses = []
    for _ in range(times):
        async with http.post(url, json=body, headers=AUTH) as resp:
            statuses.append(resp.status)
    return statuses


async def test_rate_limit_answers_429_per_endpoint(
    http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient
) -> None:
    config = await admin(http, sleep_emu, "config")
    assert config["limits"]["run"] == {"requests": 1000, "per_seconds": 10.0, "concurrent": 200}
    assert config["limits"]["cancel"] == {"requests": 100, "per_seconds": 10.0, "concurrent": 20}
    limits = {"requests": 3, "per_seconds": 60, "concurrent": None}
    await admin(http, sleep_emu, "config", {"limits": {"run": limits, "cancel": limits}})
    run = f"{sleep_emu.base}/{ENDPOINT}/run"
    assert await _post_statuses(http, run, 5, {"input": {}}) == [200, 200, 200, 429, 429]
    # Per endpoint: another endpoint id has its own window.
    assert await _post_statuses(http, f"{sleep_emu.base}/other/run", 1, {"input": {}}) == [200]
    cancel = f"{sleep_emu.base}/{ENDPOINT}/cancel/nope"
    assert await _post_statuses(http, cancel, 4) == [404, 404, 404, 429]
    stats = await admin(http, sleep_emu, "stats")
    assert stats["runs_received"] == 6 and len(await admin(http, sleep_emu, "jobs")) == 4


async def test_concurrency_limit_answers_429_while_requests_are_in_flight(
    http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient
) -> None:
    await admin(http, sleep_emu, "config", {"limits": {"run": {"requests": 100, "per_seconds": 10, "concurrent": 2}}})
    await admin(http, sleep_emu, "faults", {"run_answer_delay_ms": 1500})  # each /run stays in flight 1.5 s
    run = f"{sleep_emu.base}/{ENDPOINT}/run"
    batches = await asyncio.gather(*(_post_statuses(http, run, 1, {"input": {}}) for _ in range(4)))
    assert sorted(status for (status,) in batches) == [200, 200, 429, 429]
    await admin(http, sleep_emu, "faults/clear")
    assert await _post_statuses(http, run, 1, {"input": {}}) == [200]


async def test_status_rate_limit(http: aiohttp.ClientSession, sleep_emu: RunPodEmu, sleep_client: RunPodClient) -> None:
    await admin(http, sleep_emu, "config", {"limits": {"status": {"requests": 2, "per_seconds": 60}}})
    job_id = await sleep_client.run({})
    statuses = []
    for _ in range(3):
        async with http.get(f"{sleep_emu.base}/{ENDPOINT}/status/{job_id}", headers=AUTH) as resp:
            statuses.append(resp.status)
    assert statuses == [200, 200, 429]
    await admin(http, sleep_emu, "reset")  # a reset empties the windows
    async with http.get(f"{sleep_emu.base}/{ENDPOINT}/status/{job_id}", headers=AUTH) as resp:
        assert resp.status == 404


async def test_bad_limit_is_refused_and_changes_nothing(http: aiohttp.ClientSession, sleep_emu: RunPodEmu) -> None:
    before = await admin(http, sleep_emu, "config")
    bad = {"result_ttl_seconds": 5, "limits": {"run": {"requests": 0, "per_seconds": 10}}}
    async with http.post(f"{sleep_emu.url}/_emulator/config", json=bad) as resp:
        assert resp.status == 400 and "requests" in (await resp.json())["error"]
    assert await admin(http, sleep_emu, "config") == before


# ------------------------------------------------------------------------------------------ /health


async def test_health_counts_jobs_and_workers(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    assert (await health(http, handler_emu))["workers"] == {
        "idle": 1, "initializing": 0, "ready": 1, "running": 0, "throttled": 0, "unhealthy": 0,
    }  # fmt: skip
    running = [await client.run({"sleep": 5}) for _ in range(3)]
    for job_id in running:
        await wait_status(client, job_id, "IN_PROGRESS")
    queued = await client.run({})
    report = await health(http, handler_emu)
    assert report["jobs"] == {"completed": 0, "failed": 0, "inProgress": 3, "inQueue": 1, "retried": 0}
    assert report["workers"]["running"] == 1 and report["workers"]["idle"] == 0
    for job_id in [*running, queued]:
        await client.cancel(job_id)
    assert (await health(http, handler_emu))["jobs"]["inProgress"] == 0


async def test_health_shows_a_crashed_worker_unhealthy_and_fails_its_jobs(
    http: aiohttp.ClientSession, emu_dir: Path
) -> None:
    emu = start_emulator(emu_dir, "runpod-crash", "--workers", "2", "--handler", str(emu_dir / "handler.py"))
    try:
        assert (await health(http, emu))["workers"]["initializing"] == 2  # still importing the SDK
        await wait_workers(http, emu, 2)
        client = _client(http, emu)
        job_id = await client.run({"sleep": 30})
        await wait_status(client, job_id, "IN_PROGRESS")
        pod = (await client.status(job_id) or {})["workerId"]
        report = await health(http, emu)
        assert report["workers"]["running"] == 1 and report["workers"]["idle"] == 1
        assert report["jobs"]["inProgress"] == 1

        await admin(http, emu, f"workers/{pod}/signal", {"signal": "SIGKILL"})
        final = await wait_final(client, job_id)
        assert final["status"] == "FAILED" and f"worker {pod} was killed by SIGKILL" in final["error"]
        report = await health(http, emu)
        assert report["workers"] == {
            "idle": 1, "initializing": 0, "ready": 1, "running": 0, "throttled": 0, "unhealthy": 1,
        }  # fmt: skip
        assert report["jobs"] == {"completed": 0, "failed": 1, "inProgress": 0, "inQueue": 0, "retried": 0}
        # The other worker still serves the endpoint.
        assert (await wait_final(client, await client.run({})))["status"] == "COMPLETED"
    finally:
        emu.process.stop()


# ------------------------------------------------------------------------------------------ client and HTTP


async def test_client_retries_429_then_succeeds(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    await admin(http, handler_emu, "faults", {"run_http_429": 2, "status_http_500": 1})
    job_id = await client.run({"n": 1})
    assert (await wait_final(client, job_id))["status"] == "COMPLETED"
    stats = await admin(http, handler_emu, "stats")
    assert stats["runs_received"] == 3
    assert [r["id"] for r in await admin(http, handler_emu, "jobs")] == [job_id]


async def test_client_gives_up_after_attempts(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    await admin(http, handler_emu, "faults", {"run_http_500": 10})
    with pytest.raises(RunPodError) as info:
        await _client(http, handler_emu, attempts=3).run({"n": 1})
    assert info.value.status == 500 and info.value.retryable
    assert (await admin(http, handler_emu, "stats"))["runs_received"] == 3


async def test_auth_required(http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient) -> None:
    url = f"{handler_emu.base}/{ENDPOINT}/run"
    async with http.post(url, json={"input": {}}) as resp:
        assert resp.status == 401
    async with http.post(url, json={"input": {}}, headers={"authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    with pytest.raises(RunPodError) as info:
        await _client(http, handler_emu, api_key="wrong").run({})
    assert info.value.status == 401 and not info.value.retryable
    assert "wrong" not in str(info.value)
    assert (await admin(http, handler_emu, "stats"))["runs_received"] == 0


async def test_worker_api_wants_the_worker_key(http: aiohttp.ClientSession, handler_emu: RunPodEmu) -> None:
    (worker,) = await admin(http, handler_emu, "workers")
    take = f"{handler_emu.base}/{ENDPOINT}/job-take/{worker['pod_id']}?gpu=x&job_in_progress=0"
    for headers in ({}, AUTH, {"authorization": API_KEY}):
        async with http.get(take, headers=headers) as resp:
            assert resp.status == 401


async def test_body_over_10mb_rejected(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient
) -> None:
    with pytest.raises(RunPodError) as info:
        await client.run({"blob": "x" * (10 * 1024 * 1024)})
    assert info.value.status == 400 and not info.value.retryable
    stats = await admin(http, handler_emu, "stats")
    assert stats["max_run_body_bytes"] > 10 * 1024 * 1024 and stats["runs_received"] == 1
    assert await admin(http, handler_emu, "jobs") == []


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_sync_handler_runs_off_the_loop() -> None:
    def handler(job: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.2)  # would stall the other workers if it ran on the loop
        return {"id": job["id"]}

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    assert await call_handler(handler, {"id": "j", "input": {}}) == {"id": "j"}
    tick_task.cancel()
    assert ticks >= 5


# ------------------------------------------------------------------------------------------ webhooks


@pytest.mark.parametrize(("answers", "default", "deliveries", "failed"), [([500, 500], 200, 3, 0), ([], 503, 3, 1)])
async def test_webhook_retried_until_200(
    http: aiohttp.ClientSession,
    handler_emu: RunPodEmu,
    client: RunPodClient,
    receiver: Receiver,
    answers: list[int],
    default: int,
    deliveries: int,
    failed: int,
) -> None:
    receiver.answers, receiver.default = list(answers), default
    job_id = await client.run({}, webhook=receiver.url)
    await receiver.wait_for(deliveries)
    await asyncio.sleep(WEBHOOK_RETRY_DELAY * 2.5)  # room for a wrong 4th attempt to show up
    assert len(receiver.deliveries) == deliveries
    assert all(body["id"] == job_id for _, body in receiver.deliveries)
    times = [at for at, _ in receiver.deliveries]
    assert all(b - a >= WEBHOOK_RETRY_DELAY * 0.8 for a, b in itertools.pairwise(times))
    stats = await admin(http, handler_emu, "stats")
    assert stats["webhooks_sent"] == deliveries and stats["webhooks_failed"] == failed


async def test_webhook_on_failure_too(client: RunPodClient, receiver: Receiver) -> None:
    job_id = await client.run({"boom": "x"}, webhook=receiver.url)
    (hook,) = await receiver.wait_for(1)
    assert hook["id"] == job_id and hook["status"] == "FAILED" and "error" in hook


async def test_dropped_webhooks_never_arrive(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient, receiver: Receiver
) -> None:
    await admin(http, handler_emu, "faults", {"drop_webhooks": 1.0})
    job_id = await client.run({}, webhook=receiver.url)
    assert (await wait_final(client, job_id))["status"] == "COMPLETED"
    await asyncio.sleep(0.5)
    assert receiver.deliveries == []
    assert (await admin(http, handler_emu, "stats"))["webhooks_dropped"] == 1


async def test_duplicate_webhooks(
    http: aiohttp.ClientSession, handler_emu: RunPodEmu, client: RunPodClient, receiver: Receiver
) -> None:
    await admin(http, handler_emu, "faults", {"duplicate_webhooks": 1.0})
    job_id = await client.run({}, webhook=receiver.url)
    await receiver.wait_for(2)
    await asyncio.sleep(0.2)  # a third copy would be a bug too
    assert [body["id"] for _, body in receiver.deliveries] == [job_id, job_id]


async def test_bad_fault_rejected(http: aiohttp.ClientSession, handler_emu: RunPodEmu) -> None:
    async with http.post(f"{handler_emu.url}/_emulator/faults", json={"drop_webhooks": 2}) as resp:
        assert resp.status == 400
    async with http.post(f"{handler_emu.url}/_emulator/faults", json={"no_such_fault": 1}) as resp:
        assert resp.status == 400
