"""Groups on the real stack: create, list, details with links in bounded pages, delete (refused while jobs run)."""

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis

from deploy.stack import Stack
from services.gateway.group_pages import MAX_IMAGE_PAGE, MAX_JOB_PAGE, MAX_SLOTS_EXAMINED, Place
from services.gateway.schemas.groups import GroupDetails
from shared import keys
from shared.errors import MissingKeys
from shared.stores.groups import GroupStore
from tests.stack_helpers import client, emulator, png_bytes, redis_of, running_stack, submit, upload, wait_final

KEY_A, KEY_B = "key-a", "key-b"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-groups-",
        api_keys=f"{KEY_A}:project-a,{KEY_B}:project-b",
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={"BUNCH_POLL_INTERVAL_SECONDS": "0.5", "BUNCH_RETRY_BACKOFF_SECONDS": "0.2"},
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_A) as api:
        yield api


@pytest.fixture
async def other(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_B) as other:
        yield other


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as redis:
        yield redis


async def create_group(api: httpx.AsyncClient, name: str) -> dict[str, str]:
    response = await api.post("/api/groups", json={"name": name})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def test_group_crud_and_duplicate_names(api: httpx.AsyncClient, other: httpx.AsyncClient) -> None:
    birds = await create_group(api, "birds")
    assert set(birds) == {"id", "name", "created_at"} and birds["name"] == "birds"

    duplicate = await api.post("/api/groups", json={"name": "  birds "})  # names are stripped
    assert duplicate.status_code == 409
    assert duplicate.json()["detail"] == f"A group named 'birds' already exists: {birds['id']}."
    for bad in ({"name": ""}, {"name": "x" * 201}, {}, {"name": "ok", "extra": 1}):
        response = await api.post("/api/groups", json=bad)
        assert response.status_code == 422, (bad, response.text)

    # Names are per project: another project may use the same one, and never sees ours.
    theirs = await create_group(other, "birds")
    assert theirs["id"] != birds["id"]
    for method, path in (("GET", f"/api/groups/{birds['id']}"), ("DELETE", f"/api/groups/{birds['id']}")):
        response = await other.request(method, path)
        assert response.status_code == 404 and response.json()["detail"] == "No such group in this project."
    assert birds["id"] not in {g["id"] for g in (await other.get("/api/groups")).json()["groups"]}

    listed = {g["id"]: g for g in (await api.get("/api/groups")).json()["groups"]}
    assert listed[birds["id"]] == {**birds, "job_count": 0}
    details = (await api.get(f"/api/groups/{birds['id']}")).json()
    assert details["jobs"] == [] and details["images"] == [] and details["images_total"] == 0

    assert (await api.delete(f"/api/groups/{birds['id']}")).status_code == 204
    assert (await api.get(f"/api/groups/{birds['id']}")).status_code == 404
    assert birds["id"] not in {g["id"] for g in (await api.get("/api/groups")).json()["groups"]}
    again = await create_group(api, "birds")  # the name is free again
    assert again["id"] != birds["id"]
    assert (await other.get(f"/api/groups/{theirs['id']}")).status_code == 200


async def test_jobs_join_groups_and_delete_waits_for_them(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    foxes = await create_group(api, "foxes")
    [reference, source] = await upload(api, [png_bytes(seed=1), png_bytes(seed=2)])
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 1500})
    try:
        by_name = await submit(api, {"mode": "semi_auto", "group": "foxes", "prompts": ["fox"], "images_per_prompt": 3})
        by_id = await submit(
            api,
            {"mode": "semi_auto", "group": foxes["id"], "prompts": ["den", "cub"], "images_per_prompt": 1,
             "reference_ids": [reference]},
        )  # fmt: skip
        automatic = await submit(
            api, {"mode": "automatic", "group": "foxes", "base_prompt": "as a fox", "input_ids": [source]}
        )
        refused = await api.delete(f"/api/groups/{foxes['id']}")
        assert refused.status_code == 409, refused.text
        assert "unfinished job" in refused.json()["detail"]
        finals = await asyncio.gather(*(wait_final(api, job, stack) for job in (by_name, by_id, automatic)))
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    assert [s["status"] for s in finals] == ["completed"] * 3

    details = (await api.get(f"/api/groups/{foxes['id']}")).json()
    GroupDetails.model_validate(details)  # the documented shape
    assert [job["id"] for job in details["jobs"]] == [by_name, by_id, automatic]
    assert [job["status"] for job in details["jobs"]] == ["completed"] * 3
    assert details["jobs"][0]["progress"]["images_succeeded"] == 3
    assert details["job_count"] == 3 and details["next_job_cursor"] is None
    assert details["images_total"] == 6 and details["next_image_cursor"] is None
    assert [(i["job_id"], i["index"], i["prompt_index"], i["input_id"]) for i in details["images"]] == [
        (by_name, 0, 0, None),
        (by_name, 1, 0, None),
        (by_name, 2, 0, None),
        (by_id, 0, 0, None),
        (by_id, 1, 1, None),
        (automatic, 0, 0, source),
    ]
    # Each prompt and each job's reference images once, not once per image.
    assert details["prompts"] == {by_name: {"0": "fox"}, by_id: {"0": "den", "1": "cub"}, automatic: {"0": "as a fox"}}
    assert details["reference_ids"] == {by_name: [], by_id: [reference]}
    assert set(details["images"][0]) == {"job_id", "index", "url", "prompt_index", "input_id", "created_at"}
    async with httpx.AsyncClient() as plain:
        body = (await plain.get(details["images"][4]["url"])).content
    Image.open(io.BytesIO(body)).verify()

    # Pages follow one another through the jobs, in order, whatever their size.
    url = f"/api/groups/{foxes['id']}"
    first = (await api.get(url, params={"image_limit": 1, "job_limit": 2})).json()
    assert [i["index"] for i in first["images"]] == [0] and set(first["prompts"]) == {by_name}
    assert [job["id"] for job in first["jobs"]] == [by_name, by_id]
    second = (await api.get(url, params={"image_limit": 3, "image_cursor": first["next_image_cursor"]})).json()
    assert [(i["job_id"], i["index"]) for i in second["images"]] == [(by_name, 1), (by_name, 2), (by_id, 0)]
    assert second["prompts"] == {by_name: {"0": "fox"}, by_id: {"0": "den"}}
    third = (await api.get(url, params={"image_limit": 3, "image_cursor": second["next_image_cursor"]})).json()
    assert [(i["job_id"], i["index"]) for i in third["images"]] == [(by_id, 1), (automatic, 0)]
    assert third["next_image_cursor"] is None and third["images_total"] == 6
    # Retention drops jobs from the group while a client pages: a cursor still goes on where it was.
    index, resume = keys.group_jobs(foxes["id"]), {"image_cursor": second["next_image_cursor"]}
    created = {job: await redis.zscore(index, job) for job in (by_name, by_id)}
    await redis.zrem(index, by_name)  # a job before the cursor's
    assert [(i["job_id"], i["index"]) for i in (await api.get(url, params=resume)).json()["images"]] == [
        (by_id, 1),
        (automatic, 0),
    ]
    await redis.zadd(index, {by_name: created[by_name]})
    await redis.zrem(index, by_id)  # the cursor's own job: the next one goes on
    assert [(i["job_id"], i["index"]) for i in (await api.get(url, params=resume)).json()["images"]] == [(automatic, 0)]
    await redis.zadd(index, {by_id: created[by_id]})
    rest = {"job_limit": 2, "job_cursor": first["next_job_cursor"], "image_limit": 0}
    jobs = (await api.get(url, params=rest)).json()
    assert [job["id"] for job in jobs["jobs"]] == [automatic] and jobs["next_job_cursor"] is None
    assert jobs["images"] == [] and jobs["next_image_cursor"] is None  # image_limit=0: no images read
    for bad in (
        {"image_limit": MAX_IMAGE_PAGE + 1},
        {"job_limit": MAX_JOB_PAGE + 1},
        {"image_cursor": "12"},
        {"image_cursor": first["next_job_cursor"]},
        {"job_cursor": first["next_image_cursor"]},
        {"image_cursor": "1e999:" + "0" * 32 + ":0"},
    ):
        response = await api.get(url, params=bad)
        assert response.status_code == 422, (bad, response.text)

    listed = {g["id"]: g for g in (await api.get("/api/groups")).json()["groups"]}
    assert listed[foxes["id"]]["job_count"] == 3

    # A name nobody created yet makes a group on the fly.
    fresh = await submit(api, {"mode": "semi_auto", "group": "new one", "prompts": ["x"], "images_per_prompt": 1})
    made = [g for g in (await api.get("/api/groups")).json()["groups"] if g["name"] == "new one"]
    assert len(made) == 1 and made[0]["job_count"] == 1
    await wait_final(api, fresh, stack)

    assert (await api.delete(f"/api/groups/{foxes['id']}")).status_code == 204
    # The jobs stay, with their results.
    assert (await api.get(f"/api/jobs/{by_name}/status")).json()["status"] == "completed"


async def test_a_page_of_a_big_group_costs_the_same_whatever_the_group_holds(
    stack: Stack, api: httpx.AsyncClient
) -> None:
    """A 10,000-image job of 4,000-character prompts stopped after a few images, a small job, and a
    10,000-image job still queued: every page looks at a bounded number of slots, stays small and
    names each prompt once, and the pages together give every succeeded image once, in order."""
    prompts = [f"prompt {n:03d} " + "x" * 3989 for n in range(100)]
    big = {"mode": "semi_auto", "group": "big", "prompts": prompts, "images_per_prompt": 100}
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 300})
    try:
        stopped = await submit(api, big)
        await until_some_succeeded(api, stopped, stack)
        assert (await api.post(f"/api/jobs/{stopped}/cancel")).status_code == 200
        final = await wait_final(api, stopped, stack)
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    assert final["status"] == "canceled" and 0 < final["progress"]["images_succeeded"] < MAX_IMAGE_PAGE
    small = await submit(api, {"mode": "semi_auto", "group": "big", "prompts": ["small"], "images_per_prompt": 2})
    await wait_final(api, small, stack)
    await api.post("/api/queue/pause")  # the second big job stays queued: nothing succeeded in it
    queued = await submit(api, big)
    try:
        url, cursor = f"/api/groups/{final['group_id']}", None
        pages: list[dict[str, Any]] = []
        while True:
            params = {"image_limit": MAX_IMAGE_PAGE, "job_limit": 0, **({"image_cursor": cursor} if cursor else {})}
            response = await api.get(url, params=params)
            assert response.status_code == 200, response.text
            assert len(response.content) < 150_000
            page = response.json()
            pages.append(page)
            for by_index in page["prompts"].values():
                assert all(response.text.count(prompt) == 1 for prompt in by_index.values())
            if page["next_image_cursor"] is None:
                break
            start, following = Place.parse(cursor), Place.parse(page["next_image_cursor"])
            assert following is not None
            if start is not None and start.job_id == following.job_id:
                assert following.index - start.index <= MAX_SLOTS_EXAMINED
            cursor = page["next_image_cursor"]
    finally:
        assert (await api.post(f"/api/jobs/{queued}/cancel")).status_code == 200
        await api.post("/api/queue/resume")
    # The stopped job's 10,000 slots a thousand a page, then the small job's images; the queued
    # job is passed over on its summary.
    assert len(pages) == 10 + 1
    seen = [(image["job_id"], image["index"]) for page in pages for image in page["images"]]
    succeeded = final["progress"]["images_succeeded"]
    assert [job for job, _ in seen] == [stopped] * succeeded + [small] * 2
    assert seen[:succeeded] == sorted(seen[:succeeded]) and len(set(seen)) == len(seen)
    assert pages[-1]["images_total"] == succeeded + 2 and pages[-1]["job_count"] == 3
    assert [page["prompts"].get(stopped, {}) for page in pages[1:]] == [{}] * 10


async def until_some_succeeded(api: httpx.AsyncClient, job_id: str, stack: Stack) -> None:
    for _ in range(300):
        status = (await api.get(f"/api/jobs/{job_id}/status")).json()
        if status["progress"]["images_succeeded"]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} made no image: {status}\n{stack.logs()}")


async def test_resolve_group_creates_one_group_under_concurrency(redis: Redis) -> None:
    resolved = await asyncio.gather(*(GroupStore(redis).resolve("project-c", "same name") for _ in range(20)))
    assert len(set(resolved)) == 1
    group_id, name = resolved[0]
    assert name == "same name"
    assert await redis.hgetall(keys.project_groups("project-c")) == {"same name": group_id}
    stored = await redis.hgetall(keys.group(group_id))
    assert {k: stored[k] for k in ("id", "name", "project")} == {
        "id": group_id,
        "name": "same name",
        "project": "project-c",
    }
    assert await GroupStore(redis).resolve("project-c", group_id) == (group_id, "same name")
    # Another project's id is only a name there.
    other_id, other_name = await GroupStore(redis).resolve("project-d", group_id)
    assert other_id != group_id and other_name == group_id


async def test_resolve_group_creates_nothing_unless_the_required_keys_exist(redis: Redis) -> None:
    present = [f"test:required:{n}" for n in range(2500)]  # more than one EXISTS slice of 1,000
    await redis.mset(dict.fromkeys(present, "1"))
    assert (await GroupStore(redis).resolve("project-e", "needs keys", required=present))[1] == "needs keys"
    required = [*present[:1500], "test:required:absent-1", *present[1500:], "test:required:absent-2"]
    with pytest.raises(MissingKeys) as missing:
        await GroupStore(redis).resolve("project-f", "never made", required=required)
    assert missing.value.indices == [1500, 2501]
    assert await redis.hgetall(keys.project_groups("project-f")) == {}
    await redis.delete(*present)
