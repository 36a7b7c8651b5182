"""The front-end of the generations plan (document 003: "Queue-Based Image Generation") against
the whole stack: it polls GET /api/generations/{id} until `job.status` is "success" or "failed",
downloads the batch's ZIP from /download, and retries a failed (or canceled) job with /retry. Jobs
are submitted with Bunch's own POST /api/jobs; everything else is read as the plan's code reads it."""

import asyncio
import io
import time
import zipfile
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.compat.conftest import KEY
from tests.stack_helpers import client, submit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINAL = {"success", "failed", "canceled"}
JOB_KEYS = {
    "id",
    "type",
    "status",
    "progress",
    "error",
    "metadata",
    "startedAt",
    "completedAt",
    "createdAt",
    "updatedAt",
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def get_time(value: str) -> int:
    """`new Date(value).getTime()`: milliseconds since the epoch."""
    return (datetime.fromisoformat(value.replace("Z", "+00:00")) - EPOCH) // timedelta(milliseconds=1)


async def poll(api: httpx.AsyncClient, job_id: str, stack: Stack, within: float = 60) -> dict[str, Any]:
    """startPollingJob: GET /api/generations/{id} until the job is final; the last answer."""
    deadline = time.monotonic() + within
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await api.get(f"/api/generations/{job_id}")
        assert response.status_code == 200, response.text
        data = response.json()
        if data["job"]["status"] in FINAL:
            return data
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {data}\n{stack.logs()}")


def assert_document_error(response: httpx.Response, status: int, error: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    if error is not None:
        assert body["error"] == error


@pytest.fixture(scope="module")
async def three_images(stack: Stack) -> dict[str, Any]:
    """A completed 3-image job (one prompt), as the poll last showed it."""
    async with client(stack, KEY) as api:
        job_id = await submit(api, {"mode": "semi_auto", "prompts": ["a cat"], "images_per_prompt": 3})
        return await poll(api, job_id, stack)


async def test_poll_until_success(three_images: dict[str, Any], api: httpx.AsyncClient) -> None:
    data = three_images
    job = data["job"]
    assert set(job) == JOB_KEYS
    assert job["type"] == "image_generation"
    assert job["status"] == "success", data
    assert job["error"] is None
    assert job["progress"] == {"current": 3, "total": 3, "completedImages": [0, 1, 2]}
    assert job["metadata"]["numberOfVariations"] == 3
    assert job["metadata"]["mode"] == "semi_auto"
    assert job["metadata"]["zipUrl"]
    assert get_time(job["createdAt"]) <= get_time(job["startedAt"]) <= get_time(job["completedAt"])
    assert job["updatedAt"] == job["completedAt"]

    generation = data["generation"]
    assert generation is not None
    assert generation["id"] == job["id"]
    assert generation["status"] == "success"
    assert generation["imageCount"] == 3
    assert generation["zipUrl"] and generation["completedAt"] == job["completedAt"]

    assert [image["index"] for image in data["images"]] == [0, 1, 2]
    assert data["nextCursor"] is None
    for image in data["images"]:
        assert image["id"] == f"{job['id']}-{image['index']}"
        assert image["status"] == "success" and image["error"] is None
        assert image["prompt"] == "a cat"
        assert image["createdAt"]
    # The image links are real: a browser shows the image from them.
    async with httpx.AsyncClient(timeout=30) as browser:
        shown = await browser.get(data["images"][0]["url"])
    assert shown.status_code == 200 and shown.content.startswith(PNG_MAGIC)


async def test_images_come_in_pages(three_images: dict[str, Any], api: httpx.AsyncClient) -> None:
    job_id = three_images["job"]["id"]
    first = (await api.get(f"/api/generations/{job_id}", params={"limit": 2})).json()
    assert [image["index"] for image in first["images"]] == [0, 1]
    assert first["job"]["progress"]["completedImages"] == [0, 1]
    assert first["nextCursor"] == 2
    rest = (await api.get(f"/api/generations/{job_id}", params={"cursor": first["nextCursor"]})).json()
    assert [image["index"] for image in rest["images"]] == [2]
    assert rest["nextCursor"] is None
    past = (await api.get(f"/api/generations/{job_id}", params={"cursor": 50})).json()
    assert past["images"] == [] and past["nextCursor"] is None
    assert_document_error(await api.get(f"/api/generations/{job_id}", params={"cursor": "x"}), 422)
    assert_document_error(await api.get(f"/api/generations/{job_id}", params={"limit": 201}), 422)


async def test_download_streams_the_zip(three_images: dict[str, Any], api: httpx.AsyncClient) -> None:
    job = three_images["job"]
    async with api.stream("GET", f"/api/generations/{job['id']}/download") as response:
        assert response.status_code == 200
        chunks = [chunk async for chunk in response.aiter_raw()]
    headers = response.headers
    assert headers["content-type"] == "application/zip"
    name = f"generation-{job['id']}-{get_time(job['completedAt'])}.zip"
    assert headers["content-disposition"] == f'attachment; filename="{name}"'
    assert headers["cache-control"] == "private, max-age=0, no-store"
    body = b"".join(chunks)
    assert int(headers["content-length"]) == len(body)
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        images = [info for info in archive.infolist() if info.filename.endswith(".png")]
        assert len(images) == 3
        assert all(archive.read(info).startswith(PNG_MAGIC) for info in images)


async def test_retry_of_a_successful_job_conflicts(three_images: dict[str, Any], api: httpx.AsyncClient) -> None:
    response = await api.post(f"/api/generations/{three_images['job']['id']}/retry")
    assert_document_error(response, 409)


async def test_one_image_downloads_as_the_image(api: httpx.AsyncClient, stack: Stack) -> None:
    job_id = await submit(api, {"mode": "semi_auto", "prompts": ["a single owl"], "images_per_prompt": 1})
    data = await poll(api, job_id, stack)
    assert data["job"]["status"] == "success", data
    response = await api.get(f"/api/generations/{job_id}/download")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    name = f"generation-{job_id}-{get_time(data['job']['completedAt'])}.png"
    assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
    assert response.headers["cache-control"] == "private, max-age=0, no-store"
    assert response.content.startswith(PNG_MAGIC)
    assert int(response.headers["content-length"]) == len(response.content)


async def test_failed_job_shows_its_error_and_is_retried(api: httpx.AsyncClient, stack: Stack) -> None:
    # Every image refused for safety: nothing to package, so the job ends failed.
    job_id = await submit(api, {"mode": "semi_auto", "prompts": ["[emu:safety] x"], "images_per_prompt": 2})
    data = await poll(api, job_id, stack)
    job = data["job"]
    assert job["status"] == "failed", data
    assert job["error"]
    assert data["generation"] is None
    assert job["progress"]["current"] == job["progress"]["total"] == 2
    assert job["progress"]["completedImages"] == []
    assert job["metadata"]["zipUrl"] is None
    assert [image["index"] for image in data["images"]] == [0, 1]
    assert all(image["status"] == "failed" and image["error"] and image["url"] is None for image in data["images"])

    assert_document_error(await api.get(f"/api/generations/{job_id}/download"), 400, "Batch not completed yet")

    response = await api.post(f"/api/generations/{job_id}/retry")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["message"] == "Retry job queued successfully"
    assert body["originalJobId"] == job_id
    assert body["job"]["status"] == "queued" and body["job"]["id"] != job_id
    assert get_time(body["job"]["createdAt"]) >= get_time(job["completedAt"])
    # The new job reads as one: its own poll answers.
    assert (await api.get(f"/api/generations/{body['job']['id']}")).status_code == 200


async def test_download_before_completion_then_cancel_and_retry(api: httpx.AsyncClient, stack: Stack) -> None:
    # Each image takes 1.5 s at Gemini: the job is not completed for a while after the submit.
    body = {"mode": "semi_auto", "prompts": ["[emu:sleep=1500] a fox"], "images_per_prompt": 2}
    job_id = await submit(api, body)
    response = await api.get(f"/api/generations/{job_id}/download")
    # Asked and answered before the job completed, as the poll after it still shows.
    assert (await api.get(f"/api/generations/{job_id}")).json()["job"]["status"] in {"queued", "running"}
    assert_document_error(response, 400, "Batch not completed yet")

    canceled = await api.post(f"/api/jobs/{job_id}/cancel")
    assert canceled.status_code == 200, canceled.text
    data = await poll(api, job_id, stack)
    assert data["job"]["status"] == "canceled"
    assert data["generation"] is None

    response = await api.post(f"/api/generations/{job_id}/retry")
    assert response.status_code == 201, response.text
    retried = response.json()
    assert retried["originalJobId"] == job_id and retried["job"]["status"] == "queued"
    new = await poll(api, retried["job"]["id"], stack)
    assert new["job"]["status"] == "success", new
    assert new["job"]["progress"]["current"] == new["job"]["progress"]["total"] == 2
    assert [image["prompt"] for image in new["images"]] == ["[emu:sleep=1500] a fox"] * 2
    assert new["generation"]["imageCount"] == 2


async def test_other_projects_and_unknown_ids_are_not_found(
    three_images: dict[str, Any], other_api: httpx.AsyncClient
) -> None:
    job_id = three_images["job"]["id"]
    for job in (job_id, "0" * 32, "not-an-id"):
        assert_document_error(await other_api.get(f"/api/generations/{job}"), 404)
        assert_document_error(await other_api.get(f"/api/generations/{job}/download"), 404)
        assert_document_error(await other_api.post(f"/api/generations/{job}/retry"), 404)


async def test_missing_api_key_is_401(three_images: dict[str, Any], stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as anonymous:
        for path in ("", "/download"):
            assert_document_error(await anonymous.get(f"/api/generations/{three_images['job']['id']}{path}"), 401)
        assert_document_error(await anonymous.post(f"/api/generations/{three_images['job']['id']}/retry"), 401)
