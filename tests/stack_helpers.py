"""Helpers for tests that drive the whole stack over HTTP."""

import asyncio
import contextlib
import io
import random
import shutil
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from minio import Minio
from PIL import Image
from redis.asyncio import Redis

from deploy.processes import scratch_dir
from deploy.stack import Stack, start_stack
from shared.redis_connection import connect
from shared.settings import Settings

# Timers short enough that a test sees recovery within seconds: overdue webhooks polled after 3 s
# (every 0.5 s), failed runs retried after 0.2 s and at most 1 s.
QUICK_TIMERS = {
    "BUNCH_WEBHOOK_GRACE_SECONDS": "3",
    "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
    "BUNCH_RETRY_BACKOFF_SECONDS": "0.2",
    "BUNCH_RETRY_BACKOFF_MAX_SECONDS": "1",
}


def png_bytes(width: int = 64, height: int = 64, seed: int = 0, noise: bool = False) -> bytes:
    if noise:
        # Random pixels do not compress: a way to make a large, valid PNG.
        data = random.Random(seed).randbytes(width * height * 3)
        image = Image.frombytes("RGB", (width, height), data)
    else:
        image = Image.new("RGB", (width, height), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def client(stack: Stack, api_key: str) -> httpx.AsyncClient:
    # Idle connections are dropped well before the server's 5 s keep-alive ends: reusing one the
    # server is closing at that moment fails with "Server disconnected" (a race of HTTP/1.1 itself).
    limits = httpx.Limits(keepalive_expiry=2)
    headers = {"Authorization": f"Bearer {api_key}"}
    return httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=30, limits=limits)


async def upload(api: httpx.AsyncClient, images: list[bytes]) -> list[str]:
    files = [("files", (f"image{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = await api.post("/api/uploads", files=files)
    assert response.status_code == 201, response.text
    return [u["id"] for u in response.json()["uploads"]]


async def create_group(api: httpx.AsyncClient, name: str) -> str:
    response = await api.post("/api/groups", json={"name": name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def stack_bucket(stack: Stack, bucket: str) -> Minio:
    """A client of the stack's own S3 server (its default credentials), with `bucket` made."""
    minio = Minio(stack.s3_url.removeprefix("http://"), access_key="minioadmin", secret_key="minioadmin", secure=False)
    if not minio.bucket_exists(bucket):
        minio.make_bucket(bucket)
    return minio


async def submit(api: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await api.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return str(response.json()["id"])


async def wait_final(api: httpx.AsyncClient, job_id: str, stack: Stack, within: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + within
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await api.get(f"/api/jobs/{job_id}/status")
        assert response.status_code == 200, response.text
        status = response.json()
        if status["status"] in {"completed", "failed", "canceled"}:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {status}\n{stack.logs()}")


async def download_zip(api: httpx.AsyncClient, job_id: str) -> zipfile.ZipFile:
    response = await api.get(f"/api/jobs/{job_id}/download")
    assert response.status_code == 302, response.text
    async with httpx.AsyncClient(timeout=60) as plain:
        archive = await plain.get(response.headers["location"])
    assert archive.status_code == 200
    return zipfile.ZipFile(io.BytesIO(archive.content))


async def emulator(stack: Stack, service: str, method: str, path: str, body: Any = None) -> Any:
    base = stack.runpod_url if service == "runpod" else stack.gemini_url
    async with httpx.AsyncClient(base_url=base, timeout=10) as raw:
        response = await raw.request(method, path, json=body)
        response.raise_for_status()
        return response.json()


@contextlib.contextmanager
def running_stack(prefix: str, **options: Any) -> Iterator[Stack]:
    """A whole stack in a scratch directory of its own (`start_stack` options), removed after."""
    workdir = scratch_dir(prefix)
    stack = start_stack(workdir, **options)
    try:
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def redis_of(stack: Stack) -> AsyncIterator[Redis]:
    # Through Sentinel too, when the stack runs Redis that way.
    password = stack.service_env.get("BUNCH_REDIS_SENTINEL_PASSWORD", "")
    redis = connect(Settings(redis_url=stack.redis_url, redis_sentinel_password=password))
    try:
        yield redis
    finally:
        await redis.aclose()
