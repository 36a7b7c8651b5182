"""A queued job wakes an idle dispatcher through Pub/Sub, and keeps doing so after the subscription
is lost: a dispatcher whose poll is 30 s here must still claim a new job's first run at once.

Real redis-servers (the session's, and a private one that is restarted), the RunPod emulator as a
subprocess (its runs sleep for a minute, so no webhook comes back during a test) and the
dispatcher's own classes, in this process.
"""

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from redis.asyncio import Redis

from deploy.processes import Process, base_env, free_port, python, scratch_dir, start_redis, wait_http
from services.dispatcher.configs import ConfigCache
from services.dispatcher.dispatch import Dispatcher
from services.dispatcher.runpod_client import RunPodClient
from services.dispatcher.wakeups import JobWakeups
from shared import keys
from shared.models import SemiAutoJobRequest
from shared.redis_connection import connect
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore

API_KEY = "wakeups-test-key"
IDLE_WAIT = 30.0  # the dispatcher's poll: far longer than any bound below
CLAIMED_WITHIN = 2.0
ONE_RUN = SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4)


@pytest.fixture(scope="module")
def runpod_url() -> Iterator[str]:
    workdir = scratch_dir("bunch-wakeups-")
    port = free_port()
    args = python(
        "-m", "deploy.emulators.runpod", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "4", "--api-key", API_KEY, "--sleep-ms", "60000", "--log-level", "WARNING",
    )  # fmt: skip
    proc = Process("runpod", args, base_env(), workdir / "runpod.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_emulator/stats", proc, timeout=15)
        yield url
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def db_settings(fresh_redis: Redis, settings: Settings) -> Settings:
    """The settings of a dispatcher on fresh_redis's database (emptied around each test)."""
    return settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/9"})


@contextlib.asynccontextmanager
async def running_dispatcher(settings: Settings, runpod_url: str) -> AsyncIterator[tuple[JobStore, asyncio.Event]]:
    """The dispatcher's loop and its Pub/Sub wake-ups as services/dispatcher/__main__.py wires
    them, on the production Redis client; yields its store and the stop event of the wake-ups."""
    redis = connect(settings)
    store = JobStore(redis, settings)
    wakeup, stop, stop_wakeups = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession() as session:
        runpod = RunPodClient(session, f"{runpod_url}/v2", "wakeups", API_KEY)
        runs = RunStore(redis, settings)
        dispatcher = Dispatcher(
            runs, ConfigCache(store), Storage(settings), runpod, settings, wakeup, UpstreamStore(redis)
        )
        loops = [
            asyncio.create_task(dispatcher.run(stop, idle_wait=IDLE_WAIT)),
            asyncio.create_task(JobWakeups(redis, wakeup).run(stop_wakeups)),
        ]
        try:
            yield store, stop_wakeups
        finally:
            stop.set()
            stop_wakeups.set()
            wakeup.set()  # the dispatcher's loop ends at its next wake, not after IDLE_WAIT
            await asyncio.gather(*loops)
    await redis.aclose()


async def subscribers(redis: Redis) -> list[int]:
    """Ids of the clients subscribed to the jobs channel (the only Pub/Sub clients here)."""
    clients = await redis.client_list(_type="pubsub")
    numsub = dict(await redis.pubsub_numsub(keys.JOBS_CHANNEL))
    return [int(c["id"]) for c in clients] if numsub.get(keys.JOBS_CHANNEL) else []


async def wait_subscribed(redis: Redis, other_than: int | None = None, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ids = await subscribers(redis)
        if len(ids) == 1 and ids[0] != other_than:
            # The subscription's own wake-up has run its pass: from now on the dispatcher idles.
            await asyncio.sleep(0.5)
            return ids[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"no new subscriber to {keys.JOBS_CHANNEL} within {within}s: {await subscribers(redis)}")


async def seconds_to_claim(redis: Redis, store: JobStore, project: str) -> float:
    """Queue a one-run job and time until that run is claimed (in flight)."""
    created = time.monotonic()
    job = await store.create(project, ONE_RUN)
    run_id = keys.run_id(job.id, 0)
    while time.monotonic() - created < IDLE_WAIT / 2:
        if await redis.zscore(keys.RUNNING, run_id) is not None:
            return time.monotonic() - created
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} was not claimed: the dispatcher waited for its poll")


async def test_a_new_job_wakes_an_idle_dispatcher_also_after_its_subscription_was_killed(
    fresh_redis: Redis, db_settings: Settings, runpod_url: str
) -> None:
    async with running_dispatcher(db_settings, runpod_url) as (store, stop_wakeups):
        first = await wait_subscribed(fresh_redis)
        assert await seconds_to_claim(fresh_redis, store, "p") < CLAIMED_WITHIN

        assert await fresh_redis.client_kill_filter(_type="pubsub") == 1
        await wait_subscribed(fresh_redis, other_than=first)
        assert await seconds_to_claim(fresh_redis, store, "q") < CLAIMED_WITHIN

        # Stopping does not wait for a read to time out.
        started = time.monotonic()
        stop_wakeups.set()
        while await subscribers(fresh_redis):
            assert time.monotonic() - started < 0.5, "the subscriber outlived its stop event"
            await asyncio.sleep(0.01)


async def test_the_subscriber_outlives_a_redis_restart_and_logs_the_outage_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workdir = scratch_dir("bunch-wakeups-redis-")
    port = free_port()
    proc, url = start_redis(workdir, port)
    redis = connect(Settings(redis_url=url))
    wakeup, stop = asyncio.Event(), asyncio.Event()
    subscriber = asyncio.create_task(JobWakeups(redis, wakeup, backoff_base=0.1, backoff_cap=0.3).run(stop))
    try:
        await wait_subscribed(redis)
        wakeup.clear()
        proc.stop()
        await asyncio.sleep(1.5)  # several failed attempts to subscribe again
        assert not subscriber.done()
        proc, _ = start_redis(workdir, port)
        await wait_subscribed(redis)
        assert wakeup.is_set()  # the new subscription woke the dispatcher for what it may have missed
        wakeup.clear()
        await redis.publish(keys.JOBS_CHANNEL, "p")
        async with asyncio.timeout(CLAIMED_WITHIN):
            await wakeup.wait()
    finally:
        stop.set()
        await subscriber
        await redis.aclose()
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    lost = [r for r in caplog.records if r.name == "services.dispatcher.wakeups" and r.levelno == logging.WARNING]
    assert len(lost) == 1, [r.getMessage() for r in lost]
