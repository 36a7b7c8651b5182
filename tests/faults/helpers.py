"""What the fault tests share: a stack tuned for quick recovery, a standard job, and the checks that
a job came through a fault whole (every slot once in the ZIP, no attempt started twice on RunPod,
no stream entry left pending).

Set BUNCH_KEEP_FAULT_LOGS=1 to keep each stack's folder (every process's log) after the tests.
"""

import asyncio
import io
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from redis.asyncio import Redis

from deploy.processes import scratch_dir
from deploy.stack import Stack, start_stack
from shared import keys, tokens
from tests.stack_helpers import QUICK_TIMERS, download_zip, emulator, submit, wait_final

API_KEY = "fault-key"
PROJECT = "faults"
CAP = 4
JOB_IMAGES = 200  # 50 runs of 4

# Short timers so recovery happens within seconds: claims of abandoned stream messages after 2 s,
# overdue webhooks polled after 3 s, retries after at most 1 s.
FAST_RECOVERY = {
    "BUNCH_MAX_CONCURRENCY": str(CAP),
    "BUNCH_STREAM_CLAIM_IDLE_MS": "2000",
    **QUICK_TIMERS,
    # Sent with each run (its limits): the worker waits at most this long between Gemini attempts.
    "BUNCH_GEMINI_BACKOFF_MAX_SECONDS": "0.5",
}
# The worker's Gemini retries: quick, so injected errors cost tenths of a second, not seconds.
FAST_WORKER = {
    "GEMINI_BACKOFF_BASE_SECONDS": "0.05",
    "GEMINI_BACKOFF_MAX_SECONDS": "0.5",
    "TRANSFER_BACKOFF_MAX_SECONDS": "1",
}

# Every consumer group of every stream the services read.
GROUPS = {
    keys.TASK_RESULTS_STREAM: keys.DISPATCHER_GROUP,
    keys.CONTROL_STREAM: keys.DISPATCHER_GROUP,
    keys.PACKAGING_STREAM: keys.PACKAGER_GROUP,
    keys.DOWNLOADS_STREAM: keys.PACKAGER_GROUP,
    keys.NOTIFICATIONS_STREAM: keys.NOTIFIER_GROUP,
}


@contextmanager
def fault_stack(
    prefix: str,
    *,
    service_env: Mapping[str, str] | None = None,
    worker_env: Mapping[str, str] | None = None,
    runpod_workers: int = 8,
    gemini_latency_ms: int = 30,
    **options: Any,
) -> Iterator[Stack]:
    """A whole stack with short recovery timers, a Gemini emulator answering in ~30 ms with small
    images, and a RunPod emulator retrying failed webhooks after 0.2 s."""
    workdir = scratch_dir(prefix)
    stack = start_stack(
        workdir,
        api_keys=f"{API_KEY}:{PROJECT}",
        runpod_workers=runpod_workers,  # more than the cap: the cap, not the emulator, must be the limit
        runpod_args=("--webhook-retry-delay", "0.2"),
        gemini_args=("--latency-ms", str(gemini_latency_ms), "--image-px", "64"),
        service_env={**FAST_RECOVERY, **(service_env or {})},
        worker_env={**FAST_WORKER, **(worker_env or {})},
        **options,
    )
    try:
        yield stack
    finally:
        stack.stop()
        if not os.environ.get("BUNCH_KEEP_FAULT_LOGS"):
            shutil.rmtree(workdir, ignore_errors=True)


def api_client(stack: Stack, replica: int = 0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.gateway_url_of(replica), headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )


async def submit_job(api: httpx.AsyncClient, images: int = JOB_IMAGES, prompt: str = "a fox") -> str:
    return await submit(api, {"mode": "semi_auto", "group": "faults", "prompts": [prompt], "images_per_prompt": images})


async def wait_for(predicate: Any, *, within: float, every: float = 0.05, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if value := await predicate():
            return value
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {within}s")


async def wait_runs_done(redis: Redis, job_id: str, at_least: int, within: float = 60) -> None:
    async def reached() -> bool:
        return int(await redis.hget(keys.job(job_id), "runs_done") or 0) >= at_least

    await wait_for(reached, within=within, what=f"job {job_id} reaching {at_least} runs done")


async def runpod_jobs(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """The RunPod jobs created for a job's runs, from the emulator's log, oldest first."""
    jobs = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    return [j for j in jobs if isinstance(j.get("input"), dict) and j["input"].get("job_id") == job_id]


def claim_of(runpod_job: dict[str, Any]) -> str:
    """The claim a RunPod job was started under: the one its webhook token names."""
    token = parse_qs(urlsplit(runpod_job["webhook"]).query)["token"][0]
    run_id, attempt, claim, *_ = token.split(tokens.SEPARATOR)
    assert (run_id, int(attempt)) == (runpod_job["input"]["run_id"], runpod_job["input"]["attempt"]), token
    return claim


async def runpod_attempts(stack: Stack, job_id: str) -> Counter[tuple[str, int]]:
    """How many RunPod jobs were created for each (run, attempt) of a job."""
    return Counter((j["input"]["run_id"], j["input"]["attempt"]) for j in await runpod_jobs(stack, job_id))


async def runpod_claims(stack: Stack, job_id: str) -> Counter[tuple[str, int, str]]:
    """How many RunPod jobs were created for each claim of a job's runs."""
    return Counter((j["input"]["run_id"], j["input"]["attempt"], claim_of(j)) for j in await runpod_jobs(stack, job_id))


async def pending_entries(redis: Redis) -> dict[str, int]:
    """Entries read but not acknowledged, per stream/group (zeros left out)."""
    found = {}
    for stream, group in GROUPS.items():
        if not await redis.exists(stream):
            continue
        groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}
        if group in groups and groups[group]["pending"]:
            found[f"{stream}/{group}"] = int(groups[group]["pending"])
    return found


async def assert_nothing_pending(redis: Redis, within: float = 20) -> None:
    """Every stream entry is acknowledged in the end (XAUTOCLAIM takes what dead consumers held),
    and none was given up on."""
    deadline = time.monotonic() + within
    pending = await pending_entries(redis)
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        pending = await pending_entries(redis)
    assert not pending, f"stream entries still pending after {within}s: {pending}"
    assert await redis.xlen(keys.DEAD_LETTERS_STREAM) == 0, await redis.xrange(keys.DEAD_LETTERS_STREAM)


def expected_names(images: int) -> list[str]:
    return [f"{index:05d}.png" for index in range(images)] + ["manifest.json"]


async def assert_job_whole(
    stack: Stack,
    api: httpx.AsyncClient,
    redis: Redis,
    job_id: str,
    *,
    images: int = JOB_IMAGES,
    within: float = 90,
    claims_may_be_lost: bool = False,
) -> dict[str, Any]:
    """The job completed with every image; its ZIP holds each slot exactly once and is intact; no
    (run, attempt) was started twice on RunPod; nothing is left pending in the streams."""
    status = await wait_final(api, job_id, stack, within=within)
    assert status["status"] == "completed", f"{status}\n{stack.logs()}"
    assert status["progress"]["images_succeeded"] == images, status
    assert status["progress"]["images_failed"] == 0, status
    assert status["progress"]["runs_done"] == status["progress"]["runs_total"], status
    archive = await download_zip(api, job_id)
    assert isinstance(archive.fp, io.BytesIO)
    assert len(archive.fp.getbuffer()) == status["zip"]["bytes"]  # the object the job points at, whole
    names = archive.namelist()
    assert sorted(names) == expected_names(images), Counter(names).most_common(3)
    assert archive.testzip() is None  # every member's CRC checks out: nothing half-written
    # After a failover that lost claims, a run may be claimed again under the same attempt: never
    # under the same claim.
    starts = await (runpod_claims(stack, job_id) if claims_may_be_lost else runpod_attempts(stack, job_id))
    twice = {started: n for started, n in starts.items() if n > 1}
    assert not twice, f"runs started more than once on RunPod for the same attempt or claim: {twice}"
    assert len({started[0] for started in starts}) == images // 4
    await assert_nothing_pending(redis)
    return status
