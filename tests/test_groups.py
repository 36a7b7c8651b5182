"""Groups on the real stack: create, list, details with links, delete (refused while jobs run)."""

import asyncio
import io
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis

from deploy.stack import Stack
from services.gateway.groups import resolve_group
from shared import keys
from shared.jobstore import MissingKeys
from tests.stack_helpers import client, emulator, redis_of, running_stack, submit, wait_final

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


async def test_jobs_join_groups_and_delete_waits_for_them(stack: Stack, api: httpx.AsyncClient) -> None:
    foxes = await create_group(api, "foxes")
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 1500})
    try:
        by_name = await submit(api, {"mode": "semi_auto", "group": "foxes", "prompts": ["fox"], "images_per_prompt": 3})
        by_id = await submit(
            api, {"mode": "semi_auto", "group": foxes["id"], "prompts": ["den"], "images_per_prompt": 2}
        )
        refused = await api.delete(f"/api/groups/{foxes['id']}")
        assert refused.status_code == 409, refused.text
        assert "unfinished job" in refused.json()["detail"]
        finals = await asyncio.gather(wait_final(api, by_name, stack), wait_final(api, by_id, stack))
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    assert [s["status"] for s in finals] == ["completed", "completed"]

    details = (await api.get(f"/api/groups/{foxes['id']}")).json()
    assert [job["id"] for job in details["jobs"]] == [by_name, by_id]
    assert [job["status"] for job in details["jobs"]] == ["completed", "completed"]
    assert details["jobs"][0]["progress"]["images_succeeded"] == 3
    assert details["images_total"] == 5
    assert [(i["job_id"], i["index"], i["prompt"]) for i in details["images"]] == [
        (by_name, 0, "fox"),
        (by_name, 1, "fox"),
        (by_name, 2, "fox"),
        (by_id, 0, "den"),
        (by_id, 1, "den"),
    ]
    async with httpx.AsyncClient() as plain:
        body = (await plain.get(details["images"][4]["url"])).content
    Image.open(io.BytesIO(body)).verify()
    page = (await api.get(f"/api/groups/{foxes['id']}", params={"image_offset": 1, "image_limit": 3})).json()
    assert [i["index"] for i in page["images"]] == [1, 2, 0] and page["next_image_offset"] == 4

    listed = {g["id"]: g for g in (await api.get("/api/groups")).json()["groups"]}
    assert listed[foxes["id"]]["job_count"] == 2

    # A name nobody created yet makes a group on the fly.
    fresh = await submit(api, {"mode": "semi_auto", "group": "new one", "prompts": ["x"], "images_per_prompt": 1})
    made = [g for g in (await api.get("/api/groups")).json()["groups"] if g["name"] == "new one"]
    assert len(made) == 1 and made[0]["job_count"] == 1
    await wait_final(api, fresh, stack)

    assert (await api.delete(f"/api/groups/{foxes['id']}")).status_code == 204
    # The jobs stay, with their results.
    assert (await api.get(f"/api/jobs/{by_name}/status")).json()["status"] == "completed"


async def test_resolve_group_creates_one_group_under_concurrency(redis: Redis) -> None:
    resolved = await asyncio.gather(*(resolve_group(redis, "project-c", "same name") for _ in range(20)))
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
    assert await resolve_group(redis, "project-c", group_id) == (group_id, "same name")
    # Another project's id is only a name there.
    other_id, other_name = await resolve_group(redis, "project-d", group_id)
    assert other_id != group_id and other_name == group_id


async def test_resolve_group_creates_nothing_unless_the_required_keys_exist(redis: Redis) -> None:
    present = [f"test:required:{n}" for n in range(2500)]  # more than one EXISTS slice of 1,000
    await redis.mset(dict.fromkeys(present, "1"))
    assert (await resolve_group(redis, "project-e", "needs keys", required=present))[1] == "needs keys"
    required = [*present[:1500], "test:required:absent-1", *present[1500:], "test:required:absent-2"]
    with pytest.raises(MissingKeys) as missing:
        await resolve_group(redis, "project-f", "never made", required=required)
    assert missing.value.indices == [1500, 2501]
    assert await redis.hgetall(keys.project_groups("project-f")) == {}
    await redis.delete(*present)
