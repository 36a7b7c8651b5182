"""The S3 server unreachable for 10 s: during the workers' uploads, during a client's upload and while a
ZIP is being written. Work is retried and then done; the client whose upload could not be stored
gets a 503 with a message; no half-written object is ever served.

"Unreachable" is the S3 process stopped with SIGSTOP: connections are still accepted by the kernel
but nothing answers, the way a hung or partitioned server looks, and no stored data is lost. The
services give up on a call after 3 tries of 2 s (BUNCH_S3_READ_TIMEOUT_SECONDS, BUNCH_S3_RETRIES),
well within the outage.
"""

import asyncio
import hashlib
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from shared.settings import Settings
from shared.storage import Storage
from tests.faults.helpers import (
    PROJECT,
    assert_job_whole,
    fault_stack,
    submit,
    wait_for,
    wait_runs_done,
)
from tests.stack_helpers import png_bytes, upload

pytestmark = pytest.mark.timeout(120)

OUTAGE_SECONDS = 10.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    env = {"BUNCH_S3_READ_TIMEOUT_SECONDS": "2", "BUNCH_S3_RETRIES": "2"}
    with fault_stack("bunch-s3-", service_env=env) as stack:
        yield stack


@pytest.fixture
def storage(stack: Stack) -> Storage:
    return Storage(Settings(s3_endpoint=stack.s3_url))


class Outage:
    """SIGSTOP the S3 server now, SIGCONT it OUTAGE_SECONDS later (or on leaving, whatever happens)."""

    def __init__(self, stack: Stack) -> None:
        self.proc = stack.processes["s3"]

    async def __aenter__(self) -> "Outage":
        self.proc.signal(signal.SIGSTOP)
        self.resume_at = time.monotonic() + OUTAGE_SECONDS
        return self

    async def __aexit__(self, *_: object) -> None:
        await asyncio.sleep(max(0.0, self.resume_at - time.monotonic()))
        self.proc.signal(signal.SIGCONT)


async def test_outage_during_uploads(stack: Stack, api: httpx.AsyncClient, redis: Redis, storage: Storage) -> None:
    refs = await upload(api, [png_bytes(seed=1)])
    job_id = await submit(
        api, {"mode": "semi_auto", "prompts": ["with a reference"], "reference_ids": refs, "images_per_prompt": 200}
    )
    # A small file is PUT at once; a large one is first looked up (HEAD), as it may be stored already.
    files = [png_bytes(seed=2), png_bytes(1200, 1000, seed=7, noise=True)]
    upload_ids = [hashlib.sha256(data).hexdigest()[:32] for data in files]
    await wait_runs_done(redis, job_id, 8)

    async def refused(data: bytes) -> None:
        started = time.monotonic()
        response = await api.post("/api/uploads", files=[("files", ("photo.png", data, "image/png"))])
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == "Object storage is unavailable; nothing was changed. Try again shortly."
        assert time.monotonic() - started < OUTAGE_SECONDS

    async with Outage(stack):
        # Workers' output uploads hang meanwhile; clients' uploads fail, saying why.
        await asyncio.gather(*(refused(data) for data in files))
        assert int(await redis.hget(keys.job(job_id), "runs_done") or 0) < 50
    for upload_id, data in zip(upload_ids, files, strict=True):
        # Nothing of a refused upload is usable ...
        assert await redis.get(keys.upload(PROJECT, upload_id)) is None
        # ... and the client's retry stores it whole, whatever reached the server during the outage.
        assert await upload(api, [data]) == [upload_id]
        assert await storage.get_bytes(keys.upload_object(upload_id)) == data
    await assert_job_whole(stack, api, redis, job_id)


async def test_outage_while_packaging(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    job_id = await submit(api, {"mode": "semi_auto", "prompts": ["packed"], "images_per_prompt": 100})

    async def packaging() -> bool:
        return await redis.hget(keys.job(job_id), "status") == "packaging"

    await wait_for(packaging, within=60, every=0.005, what="the job reaching packaging")
    async with Outage(stack):
        await asyncio.sleep(OUTAGE_SECONDS - 1)
        # No ZIP can be written meanwhile: the packager has given up at least once by now.
        assert await packaging()
    await assert_job_whole(stack, api, redis, job_id, images=100)
