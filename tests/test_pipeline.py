"""The pipeline end to end, every part a real process: gateway, dispatcher, packager, redis-server,
moto's S3 server, the RunPod emulator running worker/handler.py, and the Gemini emulator reached
by the real google-genai client."""

import asyncio
import io
import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis

from deploy.stack import Stack
from services.gateway.schemas.jobs import JobResults
from shared import keys
from tests.stack_helpers import (
    QUICK_TIMERS,
    client,
    download_zip,
    emulator,
    png_bytes,
    redis_of,
    running_stack,
    submit,
    upload,
    wait_final,
)

KEY_A, KEY_B = "key-a", "key-b"
CAP = 3


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-pipeline-",
        api_keys=f"{KEY_A}:project-a,{KEY_B}:project-b",
        runpod_workers=8,  # more than the cap: the cap, not the emulator, must be the limit
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={
            "BUNCH_MAX_CONCURRENCY": str(CAP),
            **QUICK_TIMERS,
        },
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> httpx.AsyncClient:
    return client(stack, KEY_A)


@pytest.fixture
async def redis_for_stack(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as redis:
        yield redis


@pytest.fixture(autouse=True)
async def clean_faults(stack: Stack) -> None:
    await emulator(stack, "runpod", "POST", "/_emulator/faults/clear")


async def test_semi_auto_job_yields_zip_with_every_image_and_manifest(stack: Stack, api: httpx.AsyncClient) -> None:
    refs = await upload(api, [png_bytes(seed=s) for s in (1, 2, 3)])
    prompts = ["a red fox in snow", "a lighthouse at dusk"]
    job_id = await submit(
        api,
        {
            "mode": "semi_auto",
            "group": "foxes",
            "prompts": prompts,
            "reference_ids": refs,
            "images_per_prompt": 10,
            "priority": 10,
            "params": {"aspect_ratio": "1:1"},
        },
    )
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed", status
    assert status["progress"] == {
        "images_total": 20,
        "images_succeeded": 20,
        "images_failed": 0,
        "runs_total": 6,
        "runs_done": 6,
    }
    assert status["zip"]["ready"] and status["zip"]["bytes"] > 0

    archive = await download_zip(api, job_id)
    names = sorted(n for n in archive.namelist() if n.endswith(".png"))
    assert len(names) == 20
    for name in names:
        Image.open(io.BytesIO(archive.read(name))).verify()
    manifest = json.loads(archive.read("manifest.json"))
    assert len(manifest["images"]) == 20
    for entry in manifest["images"]:
        assert entry["prompt"] == prompts[entry["index"] // 10]
        assert entry["reference_ids"] == refs

    results = (await api.get(f"/api/jobs/{job_id}/results")).json()
    assert [image["status"] for image in results["images"]] == ["succeeded"] * 20
    assert results["prompts"] == {str(n): prompt for n, prompt in enumerate(prompts)}
    assert results["reference_ids"] == refs
    assert [image["prompt_index"] for image in results["images"]] == [n // 10 for n in range(20)]
    async with httpx.AsyncClient() as plain:
        for image in results["images"]:
            body = (await plain.get(image["url"])).content
            assert body == archive.read(f"{image['index']:05d}.png")


async def test_automatic_job_links_every_variation_to_its_input(stack: Stack, api: httpx.AsyncClient) -> None:
    inputs = await upload(api, [png_bytes(32, 32, seed=s) for s in range(25)])
    job_id = await submit(
        api,
        {
            "mode": "automatic",
            "group": "dataset",
            "base_prompt": "make it watercolor",
            "input_ids": inputs,
            "variations_per_image": 2,
        },
    )
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed", status
    assert status["progress"]["images_succeeded"] == 50
    results = (await api.get(f"/api/jobs/{job_id}/results")).json()
    assert len(results["images"]) == 50 and results["next_cursor"] is None
    assert results["prompts"] == {"0": "make it watercolor"} and results["reference_ids"] == []
    for image in results["images"]:
        assert image["status"] == "succeeded" and image["prompt_index"] == 0
        assert image["input_id"] == inputs[image["index"] // 2]
    archive = await download_zip(api, job_id)
    manifest = json.loads(archive.read("manifest.json"))
    assert {e["input_id"] for e in manifest["images"]} == set(inputs)


async def test_concurrency_cap_is_exactly_reached_and_never_exceeded(stack: Stack, api: httpx.AsyncClient) -> None:
    await emulator(stack, "runpod", "POST", "/_emulator/reset")
    # Slow Gemini calls keep runs in progress long enough for the cap to matter.
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 150})
    try:
        refs = await upload(api, [png_bytes(seed=9)])
        jobs = [
            await submit(
                api,
                {
                    "mode": "semi_auto",
                    "group": "cap",
                    "prompts": [f"tile {n}"],
                    "reference_ids": refs,
                    "images_per_prompt": 8,
                },
            )
            for n in range(10)
        ]
        finals = await asyncio.gather(*(wait_final(api, job, stack, within=120) for job in jobs))
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    assert [s["status"] for s in finals] == ["completed"] * 10
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert stats["max_in_progress"] == CAP, stats
    assert stats["runs_received"] == 20


async def test_jobs_complete_by_polling_when_every_webhook_is_lost(stack: Stack, api: httpx.AsyncClient) -> None:
    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"drop_webhooks": 1.0})
    refs = await upload(api, [png_bytes(seed=4)])
    job_id = await submit(
        api, {"mode": "semi_auto", "prompts": ["no webhooks"], "reference_ids": refs, "images_per_prompt": 6}
    )
    status = await wait_final(api, job_id, stack, within=60)
    assert status["status"] == "completed"
    assert status["progress"]["images_succeeded"] == 6
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert stats["webhooks_dropped"] >= 2


async def test_forged_webhooks_are_rejected_and_change_nothing(
    stack: Stack, api: httpx.AsyncClient, redis_for_stack: Redis
) -> None:
    before = await redis_for_stack.xlen(keys.TASK_RESULTS_STREAM)
    body = {"id": "x", "status": "COMPLETED", "output": {"images": []}}
    async with httpx.AsyncClient(base_url=stack.gateway_url) as raw:
        missing = await raw.post("/internal/runpod/webhook", json=body)
        forged = await raw.post("/internal/runpod/webhook?token=job.0~1~99999999999~deadbeef", json=body)
        garbage = await raw.post("/internal/runpod/webhook?token=nonsense", json=body)
    assert missing.status_code == 401 and "token" in missing.json()["detail"]
    assert forged.status_code == 403 and garbage.status_code == 403
    assert await redis_for_stack.xlen(keys.TASK_RESULTS_STREAM) == before


async def test_gemini_faults_are_per_image_and_failed_runs_are_retried(stack: Stack, api: httpx.AsyncClient) -> None:
    refs = await upload(api, [png_bytes(seed=5)])
    job_id = await submit(
        api,
        {
            "mode": "semi_auto",
            "prompts": ["[emu:429x2] patient", "[emu:safety] blocked", "fine"],
            "reference_ids": refs,
            "images_per_prompt": 2,
        },
    )
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed"
    assert status["progress"]["images_succeeded"] == 4 and status["progress"]["images_failed"] == 2
    results = (await api.get(f"/api/jobs/{job_id}/results")).json()["images"]
    assert [i["status"] for i in results] == ["succeeded", "succeeded", "failed", "failed", "succeeded", "succeeded"]
    assert {i["error"] for i in results if i["status"] == "failed"} == {"safety_blocked"}
    archive = await download_zip(api, job_id)
    assert sorted(n for n in archive.namelist() if n.endswith(".png")) == [
        "00000.png",
        "00001.png",
        "00004.png",
        "00005.png",
    ]

    await emulator(stack, "runpod", "POST", "/_emulator/faults", {"fail_next_runs": 1})
    job_id = await submit(api, {"mode": "semi_auto", "prompts": ["retry me"], "images_per_prompt": 3})
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed" and status["progress"]["images_succeeded"] == 3
    jobs = await emulator(stack, "runpod", "GET", "/_emulator/jobs")
    attempts = [j for j in jobs if j["input"]["job_id"] == job_id]
    assert [j["status"] for j in attempts] == ["FAILED", "COMPLETED"]
    assert [j["input"]["attempt"] for j in attempts] == [1, 2]


async def test_run_bodies_carry_links_not_bytes(stack: Stack, api: httpx.AsyncClient) -> None:
    big = [png_bytes(1400, 1300, seed=s, noise=True) for s in (1, 2, 3)]
    assert all(len(b) > 5_000_000 for b in big)
    refs = await upload(api, big)
    await emulator(stack, "runpod", "POST", "/_emulator/reset")
    job_id = await submit(
        api, {"mode": "semi_auto", "prompts": ["big refs"], "reference_ids": refs, "images_per_prompt": 4}
    )
    status = await wait_final(api, job_id, stack)
    assert status["status"] == "completed"
    stats = await emulator(stack, "runpod", "GET", "/_emulator/stats")
    assert 0 < stats["max_run_body_bytes"] < 64 * 1024


async def test_bad_requests_get_clear_client_errors(stack: Stack, api: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as anonymous:
        response = await anonymous.get("/api/jobs/whatever/status")
        assert response.status_code == 401 and "API key" in response.json()["detail"]
        wrong = await anonymous.get("/api/jobs/x/status", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401

    job_id = await submit(api, {"mode": "semi_auto", "prompts": ["mine"], "images_per_prompt": 1})
    other = client(stack, KEY_B)
    for path in ("status", "results", "download"):
        response = await other.get(f"/api/jobs/{job_id}/{path}")
        assert response.status_code == 404 and response.json()["detail"] == "No such job in this project."

    bad_bodies = [
        ({"mode": "sideways", "prompts": ["x"]}, "mode"),
        ({"mode": "semi_auto", "prompts": [], "images_per_prompt": 1}, "prompts"),
        ({"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 0}, "images_per_prompt"),
        (
            {"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 1, "reference_ids": ["0" * 32]},
            "Unknown upload",
        ),
        (
            {
                "mode": "semi_auto",
                "prompts": ["x"],
                "images_per_prompt": 1,
                "reference_ids": (await upload(api, [png_bytes(seed=s) for s in range(4)])),
            },
            "Too many reference",
        ),
        ({"mode": "automatic", "base_prompt": "x", "input_ids": [], "variations_per_image": 1}, "input_ids"),
    ]
    for body, expected in bad_bodies:
        response = await api.post("/api/jobs", json=body)
        assert response.status_code == 422, (body, response.text)
        assert expected in response.json()["detail"], response.json()

    not_image = await api.post("/api/uploads", files=[("files", ("notes.png", b"hello, not a png", "image/png"))])
    assert not_image.status_code == 415
    assert not_image.json()["detail"] == "notes.png: the file is not an image"
    empty = await api.post("/api/uploads", files=[("files", ("empty.png", b"", "image/png"))])
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    truncated = await api.post(
        "/api/uploads", files=[("files", ("cut.png", png_bytes(200, 200, noise=True)[:5000], "image/png"))]
    )
    assert truncated.status_code == 422 and "damaged" in truncated.json()["detail"]

    pending = await api.get(f"/api/jobs/{job_id}/download")
    assert pending.status_code in (302, 409)
    if pending.status_code == 409:
        assert "not ready" in pending.json()["detail"]


async def test_results_come_in_pages_that_name_each_prompt_once(stack: Stack, api: httpx.AsyncClient) -> None:
    # Paused: the job stays queued and its 250 images pending while it is read page by page.
    await api.post("/api/queue/pause")
    try:
        prompts = [f"prompt {n} " + "x" * 3000 for n in range(25)]
        job_id = await submit(api, {"mode": "semi_auto", "prompts": prompts, "images_per_prompt": 10})
        seen: list[int] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, str | int] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            response = await api.get(f"/api/jobs/{job_id}/results", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            JobResults.model_validate(page)  # the documented shape
            pages += 1
            indices = [image["index"] for image in page["images"]]
            seen += indices
            # Only the prompts this page's images use, each once, not one copy per image.
            assert set(page["prompts"]) == {str(i // 10) for i in indices}
            assert response.text.count("x" * 3000) == len(page["prompts"])
            assert page["images_total"] == 250
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(range(250)) and pages == 3
        too_many = await api.get(f"/api/jobs/{job_id}/results", params={"limit": 201})
        assert too_many.status_code == 422
        assert (await api.get(f"/api/jobs/{job_id}/results", params={"cursor": "-1"})).status_code == 422
        assert (await api.post(f"/api/jobs/{job_id}/cancel")).status_code == 200
    finally:
        await api.post("/api/queue/resume")
