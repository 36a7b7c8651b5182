"""Group downloads on the real stack: one ZIP with a safe folder per group, or a single image's link."""

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from deploy.stack import Stack
from tests.stack_helpers import client, create_group, running_stack, submit, wait_final

KEY_A, KEY_B = "key-a", "key-b"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-downloads-",
        api_keys=f"{KEY_A}:project-a,{KEY_B}:project-b",
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={"BUNCH_POLL_INTERVAL_SECONDS": "0.5", "BUNCH_RETRY_BACKOFF_SECONDS": "0.2"},
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_A) as api:
        yield api


async def run_jobs(api: httpx.AsyncClient, stack: Stack, bodies: list[dict[str, Any]]) -> list[str]:
    job_ids = [await submit(api, body) for body in bodies]
    finals = await asyncio.gather(*(wait_final(api, job_id, stack) for job_id in job_ids))
    assert [f["status"] for f in finals] == ["completed"] * len(job_ids), finals
    return job_ids


async def wait_download(api: httpx.AsyncClient, download_id: str, within: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await api.get(f"/api/downloads/{download_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in ("ready", "failed"):
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"download {download_id} did not finish: {body}")


async def request_download(api: httpx.AsyncClient, group_ids: list[str]) -> dict[str, Any]:
    response = await api.post("/api/downloads", json={"group_ids": group_ids})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return await wait_download(api, response.json()["id"])


async def fetch(url: str) -> bytes:
    async with httpx.AsyncClient(timeout=60) as plain:
        response = await plain.get(url)
    assert response.status_code == 200
    return response.content


def semi_auto(group: str, prompt: str, count: int) -> dict[str, Any]:
    return {"mode": "semi_auto", "group": group, "prompts": [prompt], "images_per_prompt": count}


async def test_download_zip_has_a_safe_folder_per_group_with_exactly_its_images(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    slash, dots, kanji, clash = [await create_group(api, n) for n in ("a/b", "..", "名前", "a_b")]
    job_ids = await run_jobs(
        api,
        stack,
        [
            semi_auto(slash, "first", 3),
            semi_auto(slash, "second", 2),
            # One of these two images fails: only the succeeded one is downloaded.
            {"mode": "semi_auto", "group": dots, "prompts": ["fine", "[emu:safety] blocked"], "images_per_prompt": 1},
            semi_auto(kanji, "third", 1),
            semi_auto(clash, "fourth", 2),
            semi_auto("not downloaded", "other", 1),
        ],
    )
    first, second, mixed, third, fourth, _ = job_ids

    download = await request_download(api, [slash, dots, kanji, clash, slash])
    assert download["status"] == "ready", download
    assert download["group_ids"] == [slash, dots, kanji, clash]  # duplicates asked once
    assert download["image_count"] == 9 and download["error"] is None
    assert download["zip"]["ready"] and download["zip"]["url"] == download["url"]
    body = await fetch(download["url"])
    assert len(body) == download["zip"]["bytes"]

    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    expected = {
        "a_b": [f"{first}-0000{i}.png" for i in range(3)] + [f"{second}-0000{i}.png" for i in range(2)],
        "_": [f"{mixed}-00000.png"],
        "名前": [f"{third}-00000.png"],
        f"a_b {clash}": [f"{fourth}-0000{i}.png" for i in range(2)],
    }
    names = archive.namelist()
    assert names == [f"{folder}/{file}" for folder, files in expected.items() for file in files] + ["manifest.json"]

    manifest = json.loads(archive.read("manifest.json"))
    assert [(g["id"], g["name"], g["folder"]) for g in manifest["groups"]] == [
        (slash, "a/b", "a_b"),
        (dots, "..", "_"),
        (kanji, "名前", "名前"),
        (clash, "a_b", f"a_b {clash}"),
    ]
    assert manifest["groups"][0]["job_ids"] == [first, second]
    assert [i["prompt"] for i in manifest["groups"][0]["images"]] == ["first"] * 3 + ["second"] * 2

    # The very bytes the job produced.
    results = (await api.get(f"/api/jobs/{fourth}/results")).json()["images"]
    for image in results:
        assert archive.read(f"a_b {clash}/{fourth}-{image['index']:05d}.png") == await fetch(image["url"])


async def test_a_single_image_is_linked_directly(stack: Stack, api: httpx.AsyncClient) -> None:
    lone = await create_group(api, "lone")
    (job_id,) = await run_jobs(api, stack, [semi_auto(lone, "only one", 1)])
    download = await request_download(api, [lone])
    assert download["status"] == "ready" and download["image_count"] == 1
    assert download["zip"] == {"ready": False, "bytes": None, "url": None}
    results = (await api.get(f"/api/jobs/{job_id}/results")).json()["images"]
    assert await fetch(download["url"]) == await fetch(results[0]["url"])

    empty = await create_group(api, "empty")
    failed = await request_download(api, [empty])
    assert failed["status"] == "failed" and failed["url"] is None
    assert failed["error"] == "the groups have no succeeded images"


async def test_other_projects_and_bad_requests_get_4xx(stack: Stack, api: httpx.AsyncClient) -> None:
    mine = await create_group(api, "private")
    accepted = await api.post("/api/downloads", json={"group_ids": [mine]})
    assert accepted.status_code == 202
    async with client(stack, KEY_B) as other:
        refused = await other.post("/api/downloads", json={"group_ids": [mine]})
        assert refused.status_code == 404 and refused.json()["detail"] == f"No such group in this project: {mine}."
        hidden = await other.get(f"/api/downloads/{accepted.json()['id']}")
        assert hidden.status_code == 404 and hidden.json()["detail"] == "No such download in this project."
    assert (await api.get("/api/downloads/unknown")).status_code == 404
    bad_bodies: list[dict[str, Any]] = [{"group_ids": []}, {}, {"group_ids": "x"}, {"group_ids": [mine], "more": 1}]
    for bad in bad_bodies:
        response = await api.post("/api/downloads", json=bad)
        assert response.status_code == 422, (bad, response.text)
