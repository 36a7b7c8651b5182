"""The RunPod emulator as a real subprocess, driven through the production RunPodClient.

Two instances: one runs a small handler written here (sleep / echo / raise), one runs `--sleep-ms`.
A webhook receiver in the test process records what the emulator POSTs back.
"""

import asyncio
import contextlib
import itertools
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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
ENDPOINT = "test-endpoint"
WEBHOOK_RETRY_DELAY = 0.2
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}

HANDLER = """
import asyncio


async def handler(job):
    data = job["input"]
    await asyncio.sleep(float(data.get("sleep", 0)))
    if data.get("boom"):
        raise RuntimeError(data["boom"])
    if data.get("return_error"):
        return {"error": data["return_error"], "partial": 1}
    return {"echo": data, "job_id": job["id"]}
"""


@dataclass
class Emulator:
    url: str
    process: Process

    @property
    def base(self) -> str:
        return f"{self.url}/v2"


def _start(workdir: Path, name: str, *extra: str) -> Emulator:
    port = free_port()
    args = python(
        "-m", "deploy.emulators.runpod", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "3", "--api-key", API_KEY, *extra,
    )  # fmt: skip
    proc = Process(name, args, base_env(), workdir / f"{name}.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_emulator/stats", proc, timeout=15)
    except Exception:
        proc.stop()
        raise
    return Emulator(url, proc)


@pytest.fixture(scope="module")
def emu_dir() -> Iterator[Path]:
    path = scratch_dir("bunch-runpod-emu-")
    (path / "handler.py").write_text(HANDLER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def handler_emu(emu_dir: Path) -> Iterator[Emulator]:
    emu = _start(
        emu_dir, "runpod-handler", "--handler", str(emu_dir / "handler.py"),
        "--webhook-retry-delay", str(WEBHOOK_RETRY_DELAY),
    )  # fmt: skip
    yield emu
    emu.process.stop()


@pytest.fixture(scope="module")
def sleep_emu(emu_dir: Path) -> Iterator[Emulator]:
    emu = _start(emu_dir, "runpod-sleep", "--sleep-ms", "300", "--result-ttl-seconds", "1.5")
    yield emu
    emu.process.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _admin(http: aiohttp.ClientSession, emu: Emulator, path: str, body: Any = None) -> Any:
    method = "GET" if path in ("stats", "jobs", "faults") and body is None else "POST"
    async with http.request(method, f"{emu.url}/_emulator/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def _client(http: aiohttp.ClientSession, emu: Emulator, **kwargs: Any) -> RunPodClient:
    options: dict[str, Any] = {"attempts": 5, "backoff_seconds": 0.02, "backoff_max_seconds": 0.1}
    options.update(kwargs)
    return RunPodClient(http, emu.base, ENDPOINT, options.pop("api_key", API_KEY), **options)


@pytest.fixture
async def client(http: aiohttp.ClientSession, handler_emu: Emulator) -> RunPodClient:
    await _admin(http, handler_emu, "reset")
    await _admin(http, handler_emu, "faults/clear")
    return _client(http, handler_emu)


@pytest.fixture
async def sleep_client(http: aiohttp.ClientSession, sleep_emu: Emulator) -> RunPodClient:
    await _admin(http, sleep_emu, "reset")
    await _admin(http, sleep_emu, "faults/clear")
    return _client(http, sleep_emu)


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


async def wait_final(client: RunPodClient, job_id: str, within: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = await client.status(job_id)
        assert body is not None, f"{job_id} vanished"
        if body["status"] in FINAL:
            return body
        await asyncio.sleep(0.03)
    raise AssertionError(f"{job_id} not final after {within}s: {body}")


async def wait_status(client: RunPodClient, job_id: str, status: str, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = await client.status(job_id)
        if body is not None and body["status"] == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} never reached {status}")


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
    assert final["workerId"]

    (hook,) = await receiver.wait_for(1)
    assert hook["id"] == job_id and hook["status"] == "COMPLETED"
    assert hook["output"] == final["output"]
    assert hook["input"] == job_input and hook["webhook"] == receiver.url


async def test_workers_cap_concurrency_exactly(
    http: aiohttp.ClientSession, sleep_emu: Emulator, sleep_client: RunPodClient
) -> None:
    ids = await asyncio.gather(*(sleep_client.run({"n": n}) for n in range(10)))
    assert len(set(ids)) == 10
    deadline = time.monotonic() + 5
    while (stats := await _admin(http, sleep_emu, "stats"))["completed"] < 10:
        assert stats["in_progress"] <= 3
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert stats["max_in_progress"] == 3
    assert stats["runs_received"] == 10
    body = await sleep_client.status(ids[-1])
    assert body is not None and body["output"] == {"images": []}


async def test_results_expire_after_ttl(sleep_client: RunPodClient) -> None:
    job_id = await sleep_client.run({})
    assert (await wait_final(sleep_client, job_id))["status"] == "COMPLETED"
    await asyncio.sleep(1.7)
    assert await sleep_client.status(job_id) is None


async def test_purge_queue_removes_only_waiting_jobs(
    http: aiohttp.ClientSession, sleep_emu: Emulator, sleep_client: RunPodClient
) -> None:
    ids = [await sleep_client.run({"n": n}) for n in range(5)]
    await asyncio.sleep(0.05)
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with http.post(f"{sleep_emu.base}/{ENDPOINT}/purge-queue", headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["removed"] == 2
    assert await sleep_client.status(ids[4]) is None
    assert (await wait_final(sleep_client, ids[0]))["status"] == "COMPLETED"


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


async def test_fail_next_runs(http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient) -> None:
    await _admin(http, handler_emu, "faults", {"fail_next_runs": 2})
    ids = [await client.run({"n": n}) for n in range(3)]
    finals = [await wait_final(client, job_id) for job_id in ids]
    assert [f["status"] for f in finals] == ["FAILED", "FAILED", "COMPLETED"]
    assert finals[0]["error"] == "emulated worker failure"
    assert (await _admin(http, handler_emu, "faults"))["fail_next_runs"] == 0


async def test_cancel_queued_and_running(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    blockers = [await client.run({"sleep": 3}) for _ in range(3)]
    for job_id in blockers:
        await wait_status(client, job_id, "IN_PROGRESS")
    queued = await client.run({"sleep": 0})
    assert (await client.status(queued) or {})["status"] == "IN_QUEUE"

    assert await client.cancel(queued) == {"id": queued, "status": "CANCELLED"}
    assert await client.cancel(blockers[0]) == {"id": blockers[0], "status": "CANCELLED"}
    await asyncio.sleep(0.3)  # a freed worker would have picked the queued job by now

    records = {r["id"]: r for r in await _admin(http, handler_emu, "jobs")}
    assert records[queued]["status"] == "CANCELLED" and records[queued]["started_at"] is None
    assert records[blockers[0]]["status"] == "CANCELLED"
    assert records[blockers[1]]["status"] == "IN_PROGRESS"
    stats = await _admin(http, handler_emu, "stats")
    assert stats["cancelled"] == 2 and stats["cancel_calls"] == 2 and stats["in_progress"] == 2
    for job_id in blockers[1:]:
        await client.cancel(job_id)


async def test_execution_timeout_times_out(client: RunPodClient) -> None:
    job_id = await client.run({"sleep": 5}, policy={"executionTimeout": 300})
    final = await wait_final(client, job_id, within=3)
    assert final["status"] == "TIMED_OUT"
    assert 250 <= final["executionTime"] < 2000


async def test_stuck_job_stays_in_progress_until_timeout(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    await _admin(http, handler_emu, "faults", {"stuck_in_progress": 1})
    job_id = await client.run({"sleep": 0}, policy={"executionTimeout": 500})
    await asyncio.sleep(0.25)
    assert (await client.status(job_id) or {})["status"] == "IN_PROGRESS"
    assert (await wait_final(client, job_id))["status"] == "TIMED_OUT"
    record = {r["id"]: r for r in await _admin(http, handler_emu, "jobs")}[job_id]
    # Never before the timeout the policy set, though the event loop's timers are millisecond-coarse.
    assert 0.5 <= record["finished_at"] - record["started_at"] < 1.5, record


async def test_unknown_id_is_none(client: RunPodClient) -> None:
    assert await client.status("no-such-job") is None
    assert await client.cancel("no-such-job") is None


async def test_expire_results_fault(http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient) -> None:
    job_id = await client.run({})
    await wait_final(client, job_id)
    await _admin(http, handler_emu, "faults", {"expire_results": True})
    assert await client.status(job_id) is None
    await _admin(http, handler_emu, "faults/clear")
    assert (await client.status(job_id) or {})["status"] == "COMPLETED"


async def test_health_shape(client: RunPodClient) -> None:
    health = await client.health()
    assert set(health["jobs"]) >= {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert set(health["workers"]) >= {"idle", "running"}
    assert health["workers"]["idle"] + health["workers"]["running"] == 3


async def test_runsync_waits_for_result(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    async with http.post(f"{handler_emu.base}/{ENDPOINT}/runsync", json={"input": {"x": 1}}, headers=headers) as resp:
        body = await resp.json()
    assert resp.status == 200 and body["status"] == "COMPLETED" and body["output"]["echo"] == {"x": 1}


# ------------------------------------------------------------------------------------------ client and HTTP


async def test_client_retries_429_then_succeeds(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    await _admin(http, handler_emu, "faults", {"run_http_429": 2, "status_http_500": 1})
    job_id = await client.run({"n": 1})
    assert (await wait_final(client, job_id))["status"] == "COMPLETED"
    stats = await _admin(http, handler_emu, "stats")
    assert stats["runs_received"] == 3
    assert [r["id"] for r in await _admin(http, handler_emu, "jobs")] == [job_id]


async def test_client_gives_up_after_attempts(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    await _admin(http, handler_emu, "faults", {"run_http_500": 10})
    with pytest.raises(RunPodError) as info:
        await _client(http, handler_emu, attempts=3).run({"n": 1})
    assert info.value.status == 500 and info.value.retryable
    assert (await _admin(http, handler_emu, "stats"))["runs_received"] == 3


async def test_auth_required(http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient) -> None:
    url = f"{handler_emu.base}/{ENDPOINT}/run"
    async with http.post(url, json={"input": {}}) as resp:
        assert resp.status == 401
    async with http.post(url, json={"input": {}}, headers={"authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    with pytest.raises(RunPodError) as info:
        await _client(http, handler_emu, api_key="wrong").run({})
    assert info.value.status == 401 and not info.value.retryable
    assert "wrong" not in str(info.value)
    assert (await _admin(http, handler_emu, "stats"))["runs_received"] == 0


async def test_body_over_10mb_rejected(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient
) -> None:
    with pytest.raises(RunPodError) as info:
        await client.run({"blob": "x" * (10 * 1024 * 1024)})
    assert info.value.status == 400 and not info.value.retryable
    stats = await _admin(http, handler_emu, "stats")
    assert stats["max_run_body_bytes"] > 10 * 1024 * 1024 and stats["runs_received"] == 1
    assert await _admin(http, handler_emu, "jobs") == []


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
    handler_emu: Emulator,
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
    stats = await _admin(http, handler_emu, "stats")
    assert stats["webhooks_sent"] == deliveries and stats["webhooks_failed"] == failed


async def test_webhook_on_failure_too(client: RunPodClient, receiver: Receiver) -> None:
    job_id = await client.run({"boom": "x"}, webhook=receiver.url)
    (hook,) = await receiver.wait_for(1)
    assert hook["id"] == job_id and hook["status"] == "FAILED" and "error" in hook


async def test_dropped_webhooks_never_arrive(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient, receiver: Receiver
) -> None:
    await _admin(http, handler_emu, "faults", {"drop_webhooks": 1.0})
    job_id = await client.run({}, webhook=receiver.url)
    assert (await wait_final(client, job_id))["status"] == "COMPLETED"
    await asyncio.sleep(0.5)
    assert receiver.deliveries == []
    assert (await _admin(http, handler_emu, "stats"))["webhooks_dropped"] == 1


async def test_duplicate_webhooks(
    http: aiohttp.ClientSession, handler_emu: Emulator, client: RunPodClient, receiver: Receiver
) -> None:
    await _admin(http, handler_emu, "faults", {"duplicate_webhooks": 1.0})
    job_id = await client.run({}, webhook=receiver.url)
    await receiver.wait_for(2)
    await asyncio.sleep(0.2)  # a third copy would be a bug too
    assert [body["id"] for _, body in receiver.deliveries] == [job_id, job_id]


async def test_bad_fault_rejected(http: aiohttp.ClientSession, handler_emu: Emulator) -> None:
    async with http.post(f"{handler_emu.url}/_emulator/faults", json={"drop_webhooks": 2}) as resp:
        assert resp.status == 400
    async with http.post(f"{handler_emu.url}/_emulator/faults", json={"no_such_fault": 1}) as resp:
        assert resp.status == 400
