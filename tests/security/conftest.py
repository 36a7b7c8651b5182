"""Two real stacks for the bad-input and security tests, every part its own process.

- `api_stack`: redis-server, the S3 server and the gateway only. Nothing dispatches, so fuzzed and
  hostile requests cannot start paid work, and every accepted job stays queued where it can be read.
- `full_stack`: the whole pipeline (dispatcher, packager, the RunPod and Gemini emulators), with
  distinctive secrets so that a leak into a log or an answer can be found by grepping for them.
"""

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from minio import Minio
from redis.asyncio import Redis

from deploy.stack import EMULATOR_KEY, Stack
from shared import keys
from tests.stack_helpers import client, redis_of, running_stack

MIB = 1024 * 1024

# Distinctive values: each must never show up in a log line or an API answer.
KEY_A = "bk-proj-a-9fQ2xLwT7v"
KEY_B = "bk-proj-b-3mZk8RpYc1"
S3_ACCESS_KEY = "bunch-s3-access-5Hd8"  # an access key id is public by design: SigV4 links carry it
S3_SECRET_KEY = "s3-secret-Wq7Ld2Vx9Kp4Zr"
WEBHOOK_SECRET = "runpod-hook-secret-Jt4Nc8Bs"
SECRETS = {
    "an API key of project A": KEY_A,
    "an API key of project B": KEY_B,
    "the S3 secret key": S3_SECRET_KEY,
    "the RunPod webhook secret": WEBHOOK_SECRET,
    "the RunPod and Gemini (emulator) key": EMULATOR_KEY,
}
API_KEYS = f"{KEY_A}:project-a,{KEY_B}:project-b"

MAX_UPLOAD = 2 * MIB  # small, so the file over the limit is small too
PRESIGN_SECONDS = 900  # distinctive, to find in every link


UNREACHABLE_DESTINATION = {
    "endpoint": "http://127.0.0.1:9",
    "bucket": "project-b-exports",
    "access_key_id_env": "EXPORT_KEY_ID",
    "secret_access_key_env": "EXPORT_SECRET",
}


@pytest.fixture(scope="session")
def api_stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-security-api-",
        api_keys=API_KEYS,
        services=("gateway",),
        service_env={
            "BUNCH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "BUNCH_SSE_KEEPALIVE_SECONDS": "1",
            # Never reached (no packager runs here): an export's record is what these tests walk.
            "BUNCH_EXPORT_DESTINATIONS": json.dumps({"project-b": {"b-bucket": UNREACHABLE_DESTINATION}}),
            "EXPORT_KEY_ID": "export-key-id",
            "EXPORT_SECRET": "export-secret-never-shown",
        },
    ) as stack:
        yield stack


@pytest.fixture(scope="session")
def full_stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-security-full-",
        api_keys=API_KEYS,
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={
            "BUNCH_S3_ACCESS_KEY": S3_ACCESS_KEY,
            "BUNCH_S3_SECRET_KEY": S3_SECRET_KEY,
            "BUNCH_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "BUNCH_PRESIGN_EXPIRY_SECONDS": str(PRESIGN_SECONDS),
            "BUNCH_WEBHOOK_GRACE_SECONDS": "3",
            "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
            "BUNCH_RETRY_BACKOFF_SECONDS": "0.2",
        },
    ) as stack:
        yield stack


@pytest.fixture
async def api_a(api_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(api_stack, KEY_A) as api:
        yield api


@pytest.fixture
async def api_b(api_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(api_stack, KEY_B) as api:
        yield api


@pytest.fixture
async def api_redis(api_stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(api_stack) as redis:
        yield redis


@pytest.fixture
async def full_redis(full_stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(full_stack) as redis:
        yield redis


def bucket_objects(stack: Stack) -> set[str]:
    """Every object key in the stack's bucket (moto's S3 server accepts any credentials)."""
    endpoint = stack.s3_url.split("//", 1)[1]
    s3 = Minio(endpoint, access_key="any", secret_key="any", secure=False, region="us-east-1")
    if not s3.bucket_exists("bunch"):
        return set()
    return {str(obj.object_name) for obj in s3.list_objects("bunch", recursive=True)}


async def stored_state(stack: Stack, redis: Redis) -> dict[str, Any]:
    """What a refused request must not change: objects, upload and dataset records, queued jobs."""
    return {
        "objects": bucket_objects(stack),
        "uploads": {key async for key in redis.scan_iter("bunch:project:*:upload:*")},
        "datasets": {key async for key in redis.scan_iter("bunch:dataset:*")},
        "jobs": await redis.get(keys.JOB_SEQUENCE),  # counts every job ever created
    }
