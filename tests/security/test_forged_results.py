"""Forged RunPod results under a valid webhook token.

Anyone who saw a run's webhook URL holds a valid token for it. What such a callback claims is
checked before it is stored: an image claimed but never written, or written with another CRC,
fails with a reason; token counts out of bounds are refused (metrics never go negative); indices
outside the run are ignored; the job always ends, never waiting in packaging. Deeply nested JSON
is a 400, not a 500. The stack tests use the whole real stack with a RunPod emulator told to leave
the run in progress (it never calls back), so the test calls back itself.

The component tests below drive the dispatcher's result handler and the packager against a real
redis-server and moto's S3 server: object storage down while results are checked (the message is
retried, no image fails), and objects lost or changed after they were checked (the packager fails
those images and packages the rest).
"""

import asyncio
import io
import json
import socket
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from minio import Minio
from redis.asyncio import Redis
from urllib3.exceptions import MaxRetryError

from deploy.stack import EMULATOR_KEY, Stack
from services.dispatcher.configs import ConfigCache
from services.dispatcher.results import ResultHandler
from services.dispatcher.verify import Refused, parse_outcomes
from services.packager.packaging import Packager
from shared import bounded_json, keys, tokens
from shared.archive import JobArchive
from shared.models import ImageOutcome, ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore
from tests.security.conftest import KEY_A, WEBHOOK_SECRET
from tests.stack_helpers import client, emulator, png_bytes, submit, wait_final

# --- the whole stack ---------------------------------------------------------------------------


def s3_of(stack: Stack) -> Minio:
    endpoint = stack.s3_url.split("//", 1)[1]
    return Minio(endpoint, access_key="any", secret_key="any", secure=False, region="us-east-1")


def put_image(stack: Stack, key: str, data: bytes) -> None:
    s3_of(stack).put_object("bunch", key, io.BytesIO(data), len(data), "image/png")


async def post(stack: Stack, token: str, body: bytes, content_type: str = "application/json") -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as raw:
        return await raw.post(
            "/internal/runpod/webhook", params={"token": token}, content=body, headers={"Content-Type": content_type}
        )


def good(index: int, data: bytes, **changes: Any) -> dict[str, Any]:
    """What a real worker reports for an image it stored (worker/handler.py)."""
    outcome = {
        "index": index,
        "status": "succeeded",
        "error": None,
        "detail": None,
        "mime_type": "image/png",
        "bytes": len(data),
        "crc32": zlib.crc32(data),
        "prompt_tokens": 10,
        "output_tokens": 20,
    }
    return outcome | changes


class StuckRun:
    """A one-run job (4 slots) RunPod holds in progress for good: only the test calls back."""

    def __init__(self, stack: Stack, redis: Redis, job_id: str, record: dict[str, Any]) -> None:
        self.stack, self.redis, self.job_id, self.record = stack, redis, job_id, record
        self.run_id: str = record["input"]["run_id"]
        self.attempt: int = record["input"]["attempt"]
        self.runpod_id: str = record["id"]
        self.token = parse_qs(urlsplit(record["webhook"]).query)["token"][0]
        self.claim = self.token.split(tokens.SEPARATOR)[2]

    def key(self, index: int) -> str:
        return keys.image_object(self.run_id, index, self.attempt, self.claim)

    async def call_back(self, images: list[dict[str, Any]]) -> httpx.Response:
        body = {"id": self.runpod_id, "status": "COMPLETED", "output": {"images": images}}
        return await post(self.stack, self.token, json.dumps(body).encode())

    async def images(self) -> dict[int, dict[str, Any]]:
        """The job's images as the API shows them (a finished job's records are archived at once)."""
        async with client(self.stack, KEY_A) as api:
            response = await api.get(f"/api/jobs/{self.job_id}/results")
        assert response.status_code == 200, response.text
        return {image["index"]: image for image in response.json()["images"]}


@pytest.fixture
async def stuck(full_stack: Stack, full_redis: Redis) -> AsyncIterator[StuckRun]:
    await emulator(full_stack, "runpod", "POST", "/_emulator/faults", {"stuck_in_progress": 1})
    try:
        async with client(full_stack, KEY_A) as api:
            job_id = await submit(api, {"mode": "semi_auto", "prompts": ["forged"], "images_per_prompt": 4})
        run_id = keys.run_id(job_id, 0)
        deadline = time.monotonic() + 60
        while not await full_redis.hget(keys.run(run_id), "runpod_id"):  # RunPod has it, and we know its id
            assert time.monotonic() < deadline, "the run did not start"
            await asyncio.sleep(0.05)
        # Taken by a worker (stuck there): the workers may still be starting when the stack is new.
        while True:
            jobs = await emulator(full_stack, "runpod", "GET", "/_emulator/jobs")
            (record,) = [job for job in jobs if job["input"]["job_id"] == job_id]
            if record["status"] == "IN_PROGRESS":
                break
            assert time.monotonic() < deadline and record["status"] == "IN_QUEUE", record
            await asyncio.sleep(0.05)
        yield StuckRun(full_stack, full_redis, job_id, record)
    finally:
        await emulator(full_stack, "runpod", "POST", "/_emulator/faults/clear")
    # Frees the emulator's worker the stuck run holds (it would wait for its execution timeout).
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {EMULATOR_KEY}"}) as raw:
        await raw.post(f"{full_stack.runpod_url}/v2/local/cancel/{record['id']}")


async def project_metrics(stack: Stack) -> dict[str, Any]:
    async with client(stack, KEY_A) as api:
        response = await api.get("/api/queue/metrics", params={"time_range": "all"})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_forged_successes_fail_with_reasons_and_the_job_completes_with_the_rest(
    full_stack: Stack, stuck: StuckRun
) -> None:
    before = await project_metrics(full_stack)
    real, corrupt, lied = png_bytes(seed=1), png_bytes(seed=2), png_bytes(seed=3)
    put_image(full_stack, stuck.key(0), real)
    put_image(full_stack, stuck.key(2), corrupt)
    put_image(full_stack, stuck.key(3), lied)
    response = await stuck.call_back(
        [
            good(0, real),
            good(1, png_bytes(seed=4)),  # never written
            good(2, corrupt, crc32=1),
            good(3, lied, prompt_tokens=-1_000_000),
            good(4, real),  # outside the run (slots 0 to 3)
            good(10_000, real),
        ]
    )
    assert response.status_code == 200 and response.json()["accepted"] is True, response.text
    async with client(full_stack, KEY_A) as api:
        final = await wait_final(api, stuck.job_id, full_stack, within=30)
    assert final["status"] == "completed", final
    assert final["progress"]["images_succeeded"] == 1 and final["progress"]["images_failed"] == 3, final

    images = await stuck.images()
    assert sorted(images) == [0, 1, 2, 3]  # the job's slots: nothing of indices outside the run
    assert images[0]["status"] == "succeeded", images
    failed = {index: (images[index]["error"], images[index]["detail"] or "") for index in (1, 2, 3)}
    assert all(images[index]["status"] == "failed" for index in failed), images
    assert failed[1][0] == "object_mismatch" and "no image was stored" in failed[1][1], failed
    assert failed[2][0] == "object_mismatch" and "CRC-32" in failed[2][1] and "00000001" in failed[2][1], failed
    assert failed[3][0] == "invalid_result" and "prompt_tokens" in failed[3][1], failed

    job_tokens = int(await stuck.redis.hget(keys.job(stuck.job_id), "tokens") or 0)
    # 30 each for images 0, 1 and 2 (for 1 and 2 the counts were in bounds: an image lost or
    # damaged on its way to storage was still generated); none for image 3, refused whole.
    assert job_tokens == 90
    after = await project_metrics(full_stack)
    assert after["total_tokens"] >= before["total_tokens"] + job_tokens
    assert all(point["tokens"] >= 0 for point in after["hourly_breakdown"]), after

    async with client(full_stack, KEY_A) as api:
        link = await api.get(f"/api/jobs/{stuck.job_id}/download")
    assert link.status_code == 302, link.text
    async with httpx.AsyncClient(timeout=30) as plain:
        archive = zipfile.ZipFile(io.BytesIO((await plain.get(link.headers["location"])).content))
    assert archive.read("00000.png") == real
    manifest = json.loads(archive.read("manifest.json"))
    assert [entry["index"] for entry in manifest["failed"]] == [1, 2, 3]


async def test_a_run_of_nothing_but_forged_successes_fails_its_job(full_stack: Stack, stuck: StuckRun) -> None:
    response = await stuck.call_back([good(index, png_bytes(seed=index)) for index in range(4)])
    assert response.status_code == 200 and response.json()["accepted"] is True, response.text
    async with client(full_stack, KEY_A) as api:
        final = await wait_final(api, stuck.job_id, full_stack, within=30)
    assert final["status"] == "failed", final
    assert final["error"] == "no image succeeded: 4 object_mismatch", final
    # Refused when reported, before the job could reach packaging.
    details = [image["detail"] for image in (await stuck.images()).values()]
    assert details == ["no image was stored for this result"] * 4, details


async def test_out_of_bounds_reports_are_refused(full_stack: Stack, stuck: StuckRun) -> None:
    data = png_bytes(seed=5)
    for index in range(4):
        put_image(full_stack, stuck.key(index), data)
    response = await stuck.call_back(
        [
            good(0, data, output_tokens=10**12),
            good(1, data, mime_type="text/html"),
            good(2, data, prompt_tokens=True),
            {"index": 3, "status": "failed", "error": "upstream_error", "prompt_tokens": -5},
        ]
    )
    assert response.status_code == 200, response.text
    async with client(full_stack, KEY_A) as api:
        final = await wait_final(api, stuck.job_id, full_stack, within=30)
    assert final["status"] == "failed", final
    images = await stuck.images()
    assert {index: image["error"] for index, image in images.items()} == dict.fromkeys(range(4), "invalid_result")
    assert int(await stuck.redis.hget(keys.job(stuck.job_id), "tokens") or 0) == 0


def nested(levels: int) -> bytes:
    return b'{"status": "COMPLETED", "output": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


async def test_deeply_nested_callbacks_are_a_400(full_stack: Stack, full_redis: Redis) -> None:
    token = tokens.issue(WEBHOOK_SECRET, keys.run_id("0" * 32, 0), 1, "c0ffee00", 3600)
    before = await full_redis.xlen(keys.TASK_RESULTS_STREAM)
    bodies = (b"[" * 100_000 + b"]" * 100_000, b"[" * 100_000, nested(100_000), nested(bounded_json.MAX_DEPTH + 1))
    # The webhook reads its body whatever type it is declared as: as JSON, and as anything else
    # (the gateway's check of JSON bodies does not see those).
    for content_type in ("application/json", "text/plain", "application/octet-stream"):
        for body in bodies:
            response = await post(full_stack, token, body, content_type)
            assert response.status_code == 400, (content_type, len(body), response.status_code, response.text)
            assert "nests deeper than 32 levels" in response.json()["detail"], response.text
        # As deep as a body may be: read (and answered: no such run), not refused.
        response = await post(full_stack, token, nested(bounded_json.MAX_DEPTH), content_type)
        assert response.status_code == 200 and response.json()["accepted"] is False, response.text
    assert await full_redis.xlen(keys.TASK_RESULTS_STREAM) == before


# --- components: the result handler and the packager against real Redis and S3 ---------------------


def one_run_job() -> SemiAutoJobRequest:
    return SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_storage_down_while_checking_results_retries_the_message_and_fails_no_image(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    store, runs = JobStore(fresh_redis, settings), RunStore(fresh_redis, settings)
    job = await store.create("p", one_run_job())
    (run,) = (await runs.acquire_many(time.time(), time.time() + 60, 1)).runs
    run_id = run.run_id
    data = png_bytes(seed=6)
    for index in range(4):
        await storage.put_bytes(object_of(run, index), data, "image/png")
    body = {"status": "COMPLETED", "output": {"images": [good(index, data) for index in range(4)]}}
    fields = {"run_id": run_id, "attempt": str(run.attempt), "claim": run.claim, "body": json.dumps(body)}

    down = settings.model_copy(
        update={"s3_endpoint": f"http://127.0.0.1:{closed_port()}", "s3_retries": 0, "s3_connect_timeout_seconds": 1}
    )
    handler = ResultHandler(
        runs, ConfigCache(store), settings, runs.complete, Storage(down), UpstreamStore(fresh_redis)
    )
    with pytest.raises(MaxRetryError):  # raised on: the stream consumer delivers the message again
        await handler(fields)
    assert (await runs.run(run_id)).status == RunStatus.DISPATCHED  # type: ignore[union-attr]
    assert await fresh_redis.hlen(keys.job_images(job.id)) == 0

    # Delivered again once storage is back: every image checks out.
    await ResultHandler(runs, ConfigCache(store), settings, runs.complete, storage, UpstreamStore(fresh_redis))(fields)
    images = await store.images(job.id)
    assert [images[index].status for index in range(4)] == [ImageStatus.SUCCEEDED] * 4
    assert (await store.get(job.id)).status == JobStatus.PACKAGING  # type: ignore[union-attr]


def object_of(run: ClaimedRun, index: int) -> str:
    return keys.image_object(run.run_id, index, run.attempt, run.claim)


async def packaging_job(store: JobStore, storage: Storage, images: dict[int, bytes]) -> tuple[str, ClaimedRun]:
    """A one-run job in packaging whose run reported `images` (all checked out when reported)."""
    runs = RunStore(store.redis, store.settings)
    job = await store.create("p", one_run_job())
    (run,) = (await runs.acquire_many(time.time(), time.time() + 60, 1)).runs
    run_id, attempt, claim = run
    records = {}
    for index in range(4):
        if index not in images:
            records[index] = ImageRecord(status=ImageStatus.FAILED, attempt=attempt, error="no_image", finished_at=1.0)
            continue
        key = object_of(run, index)
        await storage.put_bytes(key, images[index], "image/png")
        records[index] = ImageRecord(
            status=ImageStatus.SUCCEEDED,
            attempt=attempt,
            object_key=key,
            mime_type="image/png",
            bytes=len(images[index]),
            crc32=zlib.crc32(images[index]),
            prompt_tokens=3,
            output_tokens=4,
            finished_at=time.time(),
        )
    assert await runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, records))
    assert (await store.get(job.id)).status == JobStatus.PACKAGING  # type: ignore[union-attr]
    return job.id, run


async def test_objects_lost_or_changed_before_packaging_fail_their_images_not_the_job(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    store = JobStore(fresh_redis, settings, JobArchive(storage))
    images = {index: png_bytes(seed=10 + index) for index in range(4)}
    job_id, run = await packaging_job(store, storage, images)
    await storage.delete(object_of(run, 1))  # deleted meanwhile
    changed = bytearray(images[2])
    changed[len(changed) // 2] ^= 0xFF  # the same size: only its CRC tells
    await storage.put_bytes(object_of(run, 2), bytes(changed), "image/png")
    hourly = keys.project_hourly("p")
    counted = await fresh_redis.hgetall(hourly)

    await Packager(store, storage, settings).package(job_id)

    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.COMPLETED, job
    assert (job.images_succeeded, job.images_failed) == (2, 2)
    records = await store.images(job_id)
    assert [records[index].status for index in range(4)] == [ImageStatus.SUCCEEDED, "failed", "failed", "succeeded"]
    assert records[1].error == records[2].error == "object_mismatch"
    assert "no image is stored" in (records[1].detail or "") and "CRC-32" in (records[2].detail or "")
    archive = zipfile.ZipFile(io.BytesIO(await storage.get_bytes(keys.zip_object(job_id))))
    assert sorted(archive.namelist()) == ["00000.png", "00003.png", "manifest.json"]
    assert archive.read("00003.png") == images[3]
    (hour,) = {field.split(":")[0] for field in counted if field.endswith(":succeeded")}
    now_counted = await fresh_redis.hgetall(hourly)
    assert int(now_counted[f"{hour}:succeeded"]) == int(counted[f"{hour}:succeeded"]) - 2
    assert int(now_counted[f"{hour}:failed"]) == int(counted[f"{hour}:failed"]) + 2


async def test_a_job_whose_every_object_is_gone_fails_with_a_reason(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    store = JobStore(fresh_redis, settings, JobArchive(storage))
    job_id, run = await packaging_job(store, storage, {0: png_bytes(seed=20), 2: png_bytes(seed=21)})
    for index in (0, 2):
        await storage.delete(object_of(run, index))
    await Packager(store, storage, settings).package(job_id)
    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.FAILED, job
    assert job.error is not None and job.error.startswith("no image succeeded: "), job
    assert sorted(job.error.split(": ", 1)[1].split(", ")) == ["2 no_image", "2 object_mismatch"]
    assert (job.images_succeeded, job.images_failed) == (0, 4)


def test_reports_that_cannot_be_told_apart_are_refused_and_unattributable_ones_skipped(settings: Settings) -> None:
    data = png_bytes(seed=30)
    outcomes = parse_outcomes(
        {
            "images": [
                good(0, data),
                good(0, data, crc32=5),  # which of the two is true?
                good(1, data),
                {"index": "2", "status": "succeeded"},  # no usable index: counts as missing
                {"index": -1, "status": "succeeded"},
                ["not", "an", "outcome"],
                good(3, data, bytes=settings.max_result_image_bytes + 1),
            ]
        },
        settings,
    )
    assert sorted(outcomes) == [0, 1, 3]
    assert isinstance(outcomes[0], Refused) and "more than once" in outcomes[0].detail
    assert isinstance(outcomes[1], ImageOutcome)
    assert isinstance(outcomes[3], Refused) and "above the limit" in outcomes[3].detail
    assert parse_outcomes({"images": {"0": good(0, data)}}, settings) == {}
    assert parse_outcomes(["images"], settings) == {}


async def test_one_unusable_object_has_every_other_looked_at_in_the_same_pass(
    fresh_redis: Redis, settings: Settings, storage: Storage
) -> None:
    # A deleted prefix costs one more ZIP attempt, not one per image.
    store = JobStore(fresh_redis, settings, JobArchive(storage))
    job_id, run = await packaging_job(store, storage, {i: png_bytes(seed=40 + i) for i in range(4)})
    for index in (1, 3):
        await storage.delete(object_of(run, index))
    job, (_, images) = await store.get(job_id), await store.records(job_id)
    assert job is not None
    unusable = {object_of(run, 1): "gone"}
    assert await Packager(store, storage, settings).set_aside(job, images, unusable) == 2
    records = await store.images(job_id)
    assert [records[index].error for index in range(4)] == [None, "object_mismatch", None, "object_mismatch"]
