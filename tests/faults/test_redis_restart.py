"""Redis stopped (SIGTERM) or killed (SIGKILL) mid-job and started again on its AOF (appendfsync
everysec): every job that got its 202 (more than a second before, the most a crash of the machine
could lose) completes whole, and the services reconnect by themselves."""

import asyncio
import signal
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from tests.faults.helpers import (
    assert_job_whole,
    fault_stack,
    submit_job,
    wait_for,
    wait_runs_done,
)

pytestmark = pytest.mark.timeout(150)

SERVICES = ("gateway-0", "dispatcher-0", "packager-0")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with fault_stack("bunch-redis-", redis_appendonly=True) as stack:
        yield stack


async def restart_redis_mid_job(stack: Stack, api: httpx.AsyncClient, sig: signal.Signals) -> list[str]:
    """A job in flight and another queued behind it, then Redis goes down for two seconds."""
    jobs = [await submit_job(api), await submit_job(api, images=40, prompt="queued")]
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        await wait_runs_done(redis, jobs[0], 6)
    finally:
        await redis.aclose()
    await asyncio.sleep(1.2)  # everysec: the 202s are on disk now
    proc = stack.processes["redis"]
    proc.signal(sig)
    assert proc.popen is not None
    assert await asyncio.to_thread(proc.popen.wait, 10) in (0, -signal.SIGKILL)
    await asyncio.sleep(2.0)
    stack.restart_redis()
    return jobs


async def assert_all_whole(stack: Stack, api: httpx.AsyncClient, jobs: list[str]) -> None:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        sizes = [200, 40]
        for job_id, images in zip(jobs, sizes, strict=True):
            await assert_job_whole(stack, api, redis, job_id, images=images)
        # Nobody was restarted: each service found Redis again by itself.
        assert all(stack.processes[name].alive for name in SERVICES), stack.logs()
        later = await submit_job(api, images=8, prompt="after the restart")
        await assert_job_whole(stack, api, redis, later, images=8)
    finally:
        await redis.aclose()


async def test_redis_stopped_and_restarted(stack: Stack, api: httpx.AsyncClient) -> None:
    jobs = await restart_redis_mid_job(stack, api, signal.SIGTERM)
    await assert_all_whole(stack, api, jobs)


async def test_redis_killed_and_restarted(stack: Stack, api: httpx.AsyncClient) -> None:
    jobs = await restart_redis_mid_job(stack, api, signal.SIGKILL)
    # Redis write()s the AOF before it answers, so a killed process loses nothing it acknowledged
    # (only a crash of the machine loses the last second, which fsync everysec has not yet synced):
    # no claim of a run already sent to RunPod is forgotten, and no attempt runs twice.
    await assert_all_whole(stack, api, jobs)


async def test_redis_restarted_while_a_zip_is_written(stack: Stack, api: httpx.AsyncClient) -> None:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    job_id = await submit_job(api, images=100)
    s3 = stack.processes["s3"]
    try:

        async def taken() -> bool:
            if not await redis.exists(keys.PACKAGING_STREAM):
                return False
            consumers = await redis.xinfo_consumers(keys.PACKAGING_STREAM, keys.PACKAGER_GROUP)
            return any(c["name"] == "packager-0" and c["pending"] for c in consumers)

        await wait_for(taken, within=60, every=0.005, what="the packager taking the job")
        # S3 held still, so the ZIP is being written all through Redis's absence.
        s3.signal(signal.SIGSTOP)
        stack.processes["redis"].stop()
        await asyncio.sleep(2.0)
        stack.restart_redis()
        await asyncio.sleep(2.0)
    finally:
        s3.signal(signal.SIGCONT)
        await redis.aclose()
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        await assert_job_whole(stack, api, redis, job_id, images=100)
    finally:
        await redis.aclose()
    # The packager kept at the ZIP it was writing; it did not start a second one beside it.
    log = (stack.workdir / "s3.log").read_text()
    assert log.count(f'"PUT /bunch/{keys.zip_object(job_id)}') == 1


async def test_liveness_never_asks_redis_and_readiness_does(stack: Stack) -> None:
    """A Redis outage must make the dispatcher and packager unready (no traffic, no scrape of stale
    figures) but not dead: a liveness probe that failed with Redis would restart every pod at once."""
    urls = {name: stack.metrics_url(name).removesuffix("/metrics") for name in ("dispatcher-0", "packager-0")}

    async def answers(path: str) -> dict[str, int]:
        async with httpx.AsyncClient(timeout=10) as http:
            return {name: (await http.get(url + path)).status_code for name, url in urls.items()}

    await wait_for(lambda: _all_ready(urls), within=30, every=0.2, what="the services started")
    assert await answers("/livez") == {name: 200 for name in urls}
    stack.processes["redis"].stop()
    try:
        assert await answers("/livez") == {name: 200 for name in urls}
        assert await answers("/readyz") == {name: 503 for name in urls}
    finally:
        stack.restart_redis()
    await wait_for(lambda: _all_ready(urls), within=30, every=0.2, what="the services ready again once Redis is back")


async def _all_ready(urls: dict[str, str]) -> bool:
    async with httpx.AsyncClient(timeout=10) as http:
        try:
            return all([(await http.get(url + "/readyz")).status_code == 200 for url in urls.values()])
        except httpx.ConnectError:  # not listening yet
            return False
