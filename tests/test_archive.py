"""Hot and cold state: a finished job's records leave Redis for an archive object beside its ZIP,
every read finds them there, a redo brings them back, and a Redis restart mid-way loses nothing."""

import asyncio
import gzip
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from deploy.processes import Process, scratch_dir, start_redis
from deploy.stack import Stack
from shared import keys
from shared.archive import ArchivedRecords, JobArchive
from shared.models import ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.records import Completion, ImageRecord
from shared.stores.runs import RunStore
from tests.stack_helpers import client, download_zip, redis_of, running_stack, submit, wait_final


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack("bunch-archive-", api_keys="key-archive:archive") as stack:
        yield stack


async def archived(redis: Redis, job_id: str, within: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await redis.hget(keys.job(job_id), "archived"):
        assert asyncio.get_running_loop().time() < deadline, f"job {job_id} was not archived"
        await asyncio.sleep(0.1)


async def run_keys(redis: Redis, job_id: str) -> list[str]:
    return [key async for key in redis.scan_iter(match=keys.run(f"{job_id}.*"))]


async def test_a_finished_job_is_read_from_its_archive_and_a_redo_brings_it_back(stack: Stack) -> None:
    api = client(stack, "key-archive")
    body = {"mode": "semi_auto", "prompts": ["fox", "[emu:safety] no"], "images_per_prompt": 6, "group": "arch"}
    job = await submit(api, body)
    assert (await wait_final(api, job, stack))["status"] == "completed"
    async with redis_of(stack) as redis:
        await archived(redis, job)
        # Redis keeps the summary only: no config, no image records, no run records.
        assert await redis.hget(keys.job(job), "config") is None
        assert not await redis.exists(keys.job_images(job))
        assert await run_keys(redis, job) == []
        summary = await redis.hgetall(keys.job(job))
        assert sum(len(k) + len(v) for k, v in summary.items()) < 1000

        status = (await api.get(f"/api/jobs/{job}/status")).json()
        assert status["progress"]["images_succeeded"] == 6 and status["progress"]["images_failed"] == 6
        details = (await api.get(f"/api/jobs/{job}")).json()
        assert details["config"]["prompts"] == body["prompts"]
        results = (await api.get(f"/api/jobs/{job}/results")).json()
        assert [i["status"] for i in results["images"]] == ["succeeded"] * 6 + ["failed"] * 6
        assert {i["error"] for i in results["images"][6:]} == {"safety_blocked"}
        async with httpx.AsyncClient() as plain:
            assert (await plain.get(results["images"][0]["url"])).status_code == 200
        group = (await api.get(f"/api/groups/{details['group_id']}")).json()
        assert len(group["images"]) == 6
        before = await download_zip(api, job)

        redo = await api.post(f"/api/jobs/{job}/redo", json={"indices": [1, 4]})
        assert redo.status_code == 202, redo.text
        assert await redis.hget(keys.job(job), "archived") is None  # hot again while it runs
        assert (await wait_final(api, job, stack))["status"] == "completed"
        await archived(redis, job)
        after = await download_zip(api, job)
        changed = {n for n in before.namelist() if n.endswith(".png") and before.read(n) != after.read(n)}
        assert changed == {"00001.png", "00004.png"}
        again = (await api.get(f"/api/jobs/{job}/results")).json()
        assert [i["status"] for i in again["images"]] == ["succeeded"] * 6 + ["failed"] * 6

        # A job that failed (nothing succeeded) is archived too, and its retry reads its config there.
        failed = await submit(api, {"mode": "semi_auto", "prompts": ["[emu:safety] never"], "images_per_prompt": 2})
        assert (await wait_final(api, failed, stack))["status"] == "failed"
        await archived(redis, failed)
        retry = await api.post(f"/api/jobs/{failed}/retry")
        assert retry.status_code == 202, retry.text
        retried = (await api.get(f"/api/jobs/{retry.json()['id']}")).json()
        assert retried["config"]["prompts"] == ["[emu:safety] never"]
        await wait_final(api, retry.json()["id"], stack)


@pytest.fixture
async def aof_redis() -> AsyncIterator[tuple[Path, Process, str]]:
    workdir = scratch_dir("bunch-archive-redis-")
    proc, url = start_redis(workdir, appendonly=True)
    yield workdir, proc, url
    proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def finished_job(store: JobStore, images: int = 8) -> str:
    """A job whose runs all succeeded and which the packager completed (its ZIP step left out)."""
    runs = RunStore(store.redis, store.settings)
    job = await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=images))
    claims = await runs.acquire_many(1000.0, 1030.0, 16)
    for run_id, attempt, claim in claims.runs:
        slots = await runs.run_slots(run_id, await store.config(job.id))
        records = {
            i: ImageRecord(status=ImageStatus.SUCCEEDED, attempt=attempt, object_key=f"k{i}", finished_at=1001.0)
            for i in slots
        }
        assert await runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, records))
    assert await store.transition(job.id, JobStatus.PACKAGING, JobStatus.COMPLETED, zip_key="z", zip_bytes=1)
    return job.id


async def restart(workdir: Path, proc: Process, url: str, sig: signal.Signals) -> Process:
    await asyncio.sleep(1.2)  # appendfsync everysec: what the script wrote is on disk now
    proc.signal(sig)
    assert proc.popen is not None
    await asyncio.to_thread(proc.popen.wait, 10)
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    restarted, _ = start_redis(workdir, port=port, appendonly=True)
    return restarted


async def test_a_redis_restart_mid_archive_loses_nothing(
    aof_redis: tuple[Path, Process, str], settings: Settings, storage: Storage
) -> None:
    workdir, proc, url = aof_redis
    redis = Redis.from_url(url, decode_responses=True)
    store = JobStore(redis, settings.model_copy(update={"redis_url": url, "max_concurrency": 10}), JobArchive(storage))
    try:
        job_id = await finished_job(store)
        expected = await store.records(job_id)
        # The archive object is written, then Redis dies before the script that drops the records.
        config = await redis.hget(keys.job(job_id), "config")
        images = await redis.hgetall(keys.job_images(job_id))
        assert store.archive is not None and config is not None

        await store.archive.write(
            ArchivedRecords(job_id=job_id, config=config, images={int(k): v for k, v in images.items()})
        )
        proc = await restart(workdir, proc, url, signal.SIGKILL)
        assert await redis.hget(keys.job(job_id), "archived") is None  # still hot, nothing lost
        assert await store.records(job_id) == expected
        # The packager's next delivery archives it; then Redis dies again, after the script.
        assert await store.archive_job(job_id)
        assert not await store.archive_job(job_id)  # once
        proc = await restart(workdir, proc, url, signal.SIGKILL)
        assert await redis.hget(keys.job(job_id), "archived") == "1"
        assert not await redis.exists(keys.job_images(job_id))
        assert await store.records(job_id) == expected
        # A redo's restore, then Redis dies: the records are whole in Redis and in the archive.
        await store.restore(job_id)
        proc = await restart(workdir, proc, url, signal.SIGKILL)
        assert await redis.hget(keys.job(job_id), "archived") is None
        assert await store.records(job_id) == expected
        assert await store.archive_job(job_id)
        assert await store.records(job_id) == expected
    finally:
        await redis.aclose()
        proc.stop()


async def test_a_page_of_a_huge_archive_reads_its_head_and_one_or_two_chunks(storage: Storage) -> None:
    archive = JobArchive(storage)
    job_id = "c" * 32
    images = {i: f'{{"slot":{i}}}' for i in range(2500) if i % 7}  # some slots never finished
    await archive.write(ArchivedRecords(job_id=job_id, config='{"mode":"x"}', images=images))
    page = await archive.read_page(job_id, 1900, 200)  # spans chunks 1 and 2
    assert page.images == {i: v for i, v in images.items() if 1900 <= i < 2100}
    assert page.config == '{"mode":"x"}'
    assert (await archive.read(job_id)).images == images
    chunk_objects = {k for k in await asyncio.to_thread(_listed, storage, f"jobs/{job_id}/archive/")}
    assert chunk_objects == {keys.archive_chunk(job_id, n) for n in range(3)}
    # An archive written before chunks existed (every record in the head) still reads.
    old = "d" * 32
    legacy = ArchivedRecords(job_id=old, config="{}", images={0: "a", 5: "b"}).model_dump_json().encode()
    await storage.put_bytes(keys.archive_object(old), gzip.compress(legacy), "application/gzip")
    assert (await archive.read_page(old, 4, 10)).images == {5: "b"}
    assert (await archive.read(old)).images == {0: "a", 5: "b"}


def _listed(storage: Storage, prefix: str) -> list[str]:
    return [str(o.object_name) for o in storage.client.list_objects(storage.bucket, prefix=prefix, recursive=True)]
