"""Real infrastructure for the tests: a private redis-server and moto's S3 server, on free ports."""

import os
import shutil
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from deploy.processes import scratch_dir, start_redis, start_s3
from deploy.stack import Stack
from shared.settings import Settings
from shared.storage import Storage

# In-process services and Settings() in tests use the local stack's published secrets.
os.environ.setdefault("BUNCH_ENV", "development")

LOG_TAIL_LINES = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test on a stack reports the end of each of its processes' logs: CI keeps a
    failed run's output, and a stack's scratch folder is gone once its tests end."""
    report = yield
    if report.when == "call" and report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stack):
                for label, process in value.processes.items():
                    report.sections.append(
                        (f"{label} log, last {LOG_TAIL_LINES} lines", process.log_tail(LOG_TAIL_LINES))
                    )
    return report


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = scratch_dir("bunch-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(workdir: Path) -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    proc, url = start_redis(workdir)
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def s3_url(workdir: Path) -> Iterator[str]:
    proc, url = start_s3(workdir)
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def settings(redis_url: str, s3_url: str) -> Settings:
    return Settings(
        redis_url=redis_url,
        s3_endpoint=s3_url,
        api_keys="test-key-a:project-a,test-key-b:project-b",
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def fresh_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A database of its own, emptied around each test, so other tests' data is never touched."""
    redis = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9", decode_responses=True)
    await redis.flushdb()
    yield redis
    await redis.flushdb()
    await redis.aclose()


@pytest.fixture(scope="session")
async def storage(settings: Settings) -> Storage:
    store = Storage(settings)
    await store.ensure_bucket()
    return store
