"""The queue management API's flows (document 004), run by a client written from the document
alone (tests/compat/queue_client.py) against the whole stack: enqueue → status → stats and
metrics → retry → redo → cancel. Bunch's own routes (saved batches, pause) only set the scene and
check what the client cannot see."""

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.compat.conftest import OTHER_PROJECT, PROJECT
from tests.compat.queue_client import QueueApiError, QueueClient
from tests.stack_helpers import png_bytes, upload

FINAL = {"completed", "failed", "canceled"}


@pytest.fixture
def queue(api: httpx.AsyncClient) -> QueueClient:
    return QueueClient(api, PROJECT)


async def save_batch(api: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await api.post("/api/batches", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def until_final(queue: QueueClient, job_id: str, stack: Stack, within: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + within
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = await queue.status(job_id)
        if job["status"] in FINAL:
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}\n{stack.logs()}")


async def test_enqueue_status_stats_metrics_and_redo(stack: Stack, api: httpx.AsyncClient, queue: QueueClient) -> None:
    refs = await upload(api, [png_bytes(seed=41)])
    batch_id = await save_batch(
        api,
        {"mode": "semi_auto", "prompts": ["a teapot", "a kettle"], "reference_ids": refs, "images_per_prompt": 2},
    )
    enqueued = await queue.enqueue([batch_id])
    assert enqueued["jobIds"] == [enqueued["jobId"]] and enqueued["canceledCount"] == 0
    assert isinstance(enqueued["message"], str)
    job_id = enqueued["jobId"]
    job = await queue.status(job_id)
    assert job["id"] == job_id and job["type"] == "process_batch" and job["priority"] == 10
    assert job["status"] in {"queued", "processing"} and job["maxAttempts"] == 3
    assert job["data"]["batchId"] == batch_id and job["data"]["progress"]["total"] == 4
    job = await until_final(queue, job_id, stack)
    assert job["status"] == "completed" and job["attempts"] == 1 and job["error"] is None
    assert job["createdAt"] <= job["startedAt"] <= job["completedAt"]
    assert job["data"]["progress"]["current"] == 4 and job["data"]["zipUrl"]

    stats = await queue.stats()
    assert set(stats["queue"]) == {"queued", "processing", "completed", "failed", "totalJobs"}
    assert stats["queue"]["completed"] >= 1 and stats["queue"]["totalJobs"] >= stats["queue"]["completed"]
    assert set(stats["worker"]) == {"isRunning", "activeJobs", "requestsPerMinute", "maxConcurrency"}
    assert stats["worker"]["isRunning"] is True and stats["worker"]["maxConcurrency"] == 4

    metrics = (await queue.metrics("24h"))["stats"]
    native = (await api.get("/api/queue/metrics", params={"time_range": "24h"})).json()
    assert "success" not in native and native["time_range"] == "24h"  # Bunch's own clients: unchanged
    assert metrics["successRate"] == native["success_rate"] and 0 < metrics["successRate"] <= 1
    # Milliseconds in the document, seconds in Bunch's own answer: the same figures.
    assert (
        metrics["avgDuration"] == round(native["avg_duration_s"] * 1000, -1)
        or abs(metrics["avgDuration"] - native["avg_duration_s"] * 1000) <= 1
    )
    assert metrics["minDuration"] <= metrics["avgDuration"] <= metrics["maxDuration"]
    assert abs(metrics["minDuration"] - native["min_duration_s"] * 1000) <= 1
    assert abs(metrics["maxDuration"] - native["max_duration_s"] * 1000) <= 1
    assert metrics["totalTokens"] == native["total_tokens"] > 0
    assert metrics["hourlyBreakdown"] and {"hour", "completed", "failed", "tokens"} <= set(
        metrics["hourlyBreakdown"][0]
    )
    assert (await queue.metrics("all"))["stats"]["totalTokens"] >= metrics["totalTokens"]

    # Redo row 1, column v1 (image 1 x 2 + 1 = 3) in the job itself.
    redone = await queue.redo(batch_id, 1, ["v1"], {})
    assert redone["jobId"] == job_id and redone["jobIds"] == [job_id]
    job = await until_final(queue, job_id, stack)
    assert job["status"] == "completed"
    images = (await api.get(f"/api/jobs/{job_id}/results")).json()["images"]
    attempts = {image["index"]: image for image in images}
    assert all(image["status"] == "succeeded" for image in images)
    redone_at = attempts[3]["created_at"]
    assert all(attempts[i]["created_at"] < redone_at for i in (0, 1, 2))

    # With a replaced image: a job of its own, from that row's prompt and the new image.
    cropped = (await upload(api, [png_bytes(seed=42)]))[0]
    redone = await queue.redo(batch_id, 0, ["v0", "v1"], {"v1": cropped})
    assert redone["jobIds"][0] == job_id and len(redone["jobIds"]) == 2
    replacement = redone["jobIds"][1]
    config = (await api.get(f"/api/jobs/{replacement}")).json()["config"]
    assert config["prompts"] == ["a teapot"] and config["reference_ids"] == [cropped]
    assert config["images_per_prompt"] == 1 and config["priority"] == 5
    assert (await until_final(queue, replacement, stack))["status"] == "completed"
    assert (await until_final(queue, job_id, stack))["status"] == "completed"


async def test_enqueue_again_cancels_the_batchs_unfinished_job_and_cancel_resets_batches(
    stack: Stack, api: httpx.AsyncClient, queue: QueueClient
) -> None:
    # Paused, the project's jobs stay queued: the scene the document's cancel and re-enqueue are for.
    assert (await api.post("/api/queue/pause")).status_code == 200
    try:
        first = await save_batch(api, {"mode": "semi_auto", "prompts": ["one"], "images_per_prompt": 2})
        second = await save_batch(api, {"mode": "semi_auto", "prompts": ["two"], "images_per_prompt": 2})
        both = await queue.enqueue([first, second], priority=3)
        assert len(both["jobIds"]) == 2 and both["canceledCount"] == 0
        assert [(await queue.status(j))["priority"] for j in both["jobIds"]] == [3, 3]
        again = await queue.enqueue([first])
        assert again["canceledCount"] == 1 and again["jobId"] not in both["jobIds"]
        assert (await queue.status(both["jobIds"][0]))["status"] == "canceled"
        assert (await queue.status(both["jobIds"][1]))["status"] == "queued"

        canceled = await queue.cancel([second])
        assert canceled["canceledCount"] == 1 and canceled["batchesReset"] == 1
        assert (await queue.status(both["jobIds"][1]))["status"] == "canceled"
        assert (await queue.status(again["jobId"]))["status"] == "queued"
        everything = await queue.cancel()
        assert everything["canceledCount"] == 1 and everything["batchesReset"] == 1
        assert (await queue.status(again["jobId"]))["status"] == "canceled"
        assert (await queue.cancel())["canceledCount"] == 0
    finally:
        assert (await api.post("/api/queue/resume")).status_code == 200


async def test_retry_a_failed_job_and_every_failed_job(
    stack: Stack, api: httpx.AsyncClient, queue: QueueClient
) -> None:
    # The emulator answers NO_IMAGE to the first two calls with this prompt: the worker's one retry
    # fails too, the image fails and so does the job; its retry's call succeeds.
    prompt = f"[emu:no-imagex2] a vase {uuid.uuid4().hex[:8]}"
    batch_id = await save_batch(api, {"mode": "semi_auto", "prompts": [prompt], "images_per_prompt": 1})
    job_id = (await queue.enqueue([batch_id]))["jobId"]
    failed = await until_final(queue, job_id, stack)
    assert failed["status"] == "failed" and "no_image" in failed["error"]
    assert (await queue.stats())["queue"]["failed"] >= 1

    retried = await queue.retry(job_id)
    assert isinstance(retried["message"], str) and len(retried["jobIds"]) == 1
    retry_id = retried["jobIds"][0]
    job = await until_final(queue, retry_id, stack)
    assert job["status"] == "completed" and job["attempts"] == 2 and job["data"]["retryOf"] == job_id
    assert job["data"]["batchId"] == batch_id  # the batch's latest job is now the retry
    batch = (await api.get(f"/api/batches/{batch_id}")).json()
    assert batch["latest_job_id"] == retry_id

    with pytest.raises(QueueApiError) as refused:
        await queue.retry(retry_id)
    assert refused.value.status == 409 and refused.value.body["success"] is False


async def test_errors_in_the_documents_style(api: httpx.AsyncClient, other_api: httpx.AsyncClient) -> None:
    batch_id = await save_batch(api, {"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 1})
    cases: list[tuple[httpx.Response, int]] = [
        (await api.post("/api/queue/enqueue", json={"batchId": batch_id}), 422),  # projectId is required
        (await api.post("/api/queue/enqueue", json={"projectId": PROJECT}), 422),  # no batch
        (await api.post("/api/queue/enqueue", json={"batchId": batch_id, "projectId": PROJECT, "priority": "1"}), 422),
        (await api.post("/api/queue/enqueue", json={"batchId": batch_id, "projectId": OTHER_PROJECT}), 404),
        (await other_api.post("/api/queue/enqueue", json={"batchId": batch_id, "projectId": OTHER_PROJECT}), 404),
        (await api.get(f"/api/queue/status/{uuid.uuid4().hex}"), 404),
        (await api.get("/api/queue/status/not-an-id"), 404),
        (await api.post("/api/queue/redo", json={"batchId": batch_id, "projectId": PROJECT}), 422),
        (await api.post("/api/queue/retry", json={"projectId": PROJECT}), 422),  # neither jobId nor retryAll
        (await api.post("/api/queue/retry", json={"projectId": PROJECT, "jobId": uuid.uuid4().hex}), 404),
        (await api.post("/api/queue/cancel", json={"projectId": OTHER_PROJECT}), 404),
        (await api.post("/api/queue/cancel", json={"projectId": PROJECT, "batchIds": [uuid.uuid4().hex]}), 404),
        (await api.get("/api/queue/stats", params={"projectId": OTHER_PROJECT}), 404),
        (await api.get("/api/queue/metrics", params={"projectId": PROJECT, "timeRange": "1y"}), 422),
        (await httpx.AsyncClient(base_url=str(api.base_url)).get("/api/queue/status/x"), 401),
    ]
    for response, status in cases:
        body = response.json()
        assert response.status_code == status, (response.request.url, response.text)
        assert body["success"] is False and isinstance(body["error"], str) and body["error"], body
    redo = {"batchId": batch_id, "projectId": PROJECT, "rowIndex": 0, "redoColumnIds": ["v0"], "croppedImageIds": {}}
    no_job = await api.post("/api/queue/redo", json=redo)
    assert no_job.status_code == 409 and "enqueue it first" in no_job.json()["error"]
    outside = await api.post("/api/queue/redo", json={**redo, "rowIndex": 1})
    assert outside.status_code == 422 and "rowIndex" in outside.json()["error"]
    column = await api.post("/api/queue/redo", json={**redo, "redoColumnIds": ["v1"]})
    assert column.status_code == 422 and "v1" in column.json()["error"]


async def test_bunchs_own_clients_keep_the_native_style(api: httpx.AsyncClient) -> None:
    stats = await api.get("/api/queue/stats")
    assert stats.status_code == 200 and "success" not in stats.json() and "dispatcher" in stats.json()
    refused = await api.post("/api/queue/retry", json={"job_id": uuid.uuid4().hex})
    assert refused.status_code == 404 and set(refused.json()) == {"detail"}
    invalid = await api.post("/api/queue/retry", json={})
    assert invalid.status_code == 422 and "detail" in invalid.json() and "success" not in invalid.json()
    assert (await api.post("/api/queue/cancel", json={"job_ids": []})).json() == {"canceled_count": 0}
    assert (await api.get("/api/queue/metrics", params={"time_range": "7d"})).json()["time_range"] == "7d"


async def test_the_job_queue_of_the_first_document(stack: Stack, api: httpx.AsyncClient) -> None:
    """Document 000's routes: /api/jobs/submit, /api/jobs/[id]/status, /api/jobs/[id]/results."""
    submitted = await api.post("/api/jobs/submit", json={"mode": "semi_auto", "prompts": ["a"], "images_per_prompt": 2})
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 60
    while (status := (await api.get(f"/api/jobs/{job_id}/status")).json())["status"] not in FINAL:
        assert time.monotonic() < deadline, stack.logs()
        await asyncio.sleep(0.2)
    assert status["status"] == "completed" and status["progress"]["images_succeeded"] == 2
    results = (await api.get(f"/api/jobs/{job_id}/results")).json()
    assert [image["status"] for image in results["images"]] == ["succeeded", "succeeded"]
    assert all(image["url"] and image["created_at"] for image in results["images"]) and results["prompts"]


async def test_the_compatible_routes_have_their_own_tag(api: httpx.AsyncClient) -> None:
    paths = (await api.get("/openapi.json")).json()["paths"]

    def tagged(tag: str) -> set[tuple[str, str]]:
        return {
            (method.upper(), path)
            for path, operations in paths.items()
            for method, operation in operations.items()
            if operation.get("tags") == [tag]
        }

    # The routes only the document has are its area's; those both styles share stay in the queue's.
    assert tagged("queue-management") == {
        ("POST", "/api/queue/enqueue"),
        ("GET", "/api/queue/status/{job_id}"),
        ("POST", "/api/queue/redo"),
    }
    assert {("POST", "/api/queue/retry"), ("POST", "/api/queue/cancel"), ("GET", "/api/queue/stats")} <= tagged("queue")
    assert sorted(tagged("generations")) == [
        ("GET", "/api/generations/{job_id}"),
        ("GET", "/api/generations/{job_id}/download"),
        ("POST", "/api/generations/{job_id}/retry"),
    ]
