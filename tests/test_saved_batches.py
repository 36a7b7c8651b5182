"""Saved batches (/api/batches) on the real gateway app (in process, with its lifespan) over a real
redis-server and moto's S3: stored without queueing, queued again as jobs of their own, listed
with their jobs, deleted only when none is unfinished; another project sees none of it."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from services.gateway.app import create_app
from shared import keys
from shared.settings import Settings
from shared.stores.jobs import SAVED_BATCH_JOBS_KEPT
from tests.stack_helpers import png_bytes


@pytest.fixture
def app_settings(fresh_redis: Redis, settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + "/9"
    return settings.model_copy(update={"redis_url": url, "project_max_saved_batches": 3})


@pytest.fixture
async def gateway(app_settings: Settings) -> AsyncIterator[httpx.ASGITransport]:
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        yield httpx.ASGITransport(app=app)


@pytest.fixture
async def api(gateway: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": "Bearer test-key-a"}
    async with httpx.AsyncClient(transport=gateway, base_url="http://gateway", headers=headers) as client:
        yield client


@pytest.fixture
async def api_b(gateway: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": "Bearer test-key-b"}
    async with httpx.AsyncClient(transport=gateway, base_url="http://gateway", headers=headers) as client:
        yield client


async def upload(api: httpx.AsyncClient, count: int) -> list[str]:
    files = [("files", (f"i{n}.png", png_bytes(seed=n), "image/png")) for n in range(count)]
    response = await api.post("/api/uploads", files=files)
    assert response.status_code == 201, response.text
    return [u["id"] for u in response.json()["uploads"]]


async def test_a_batch_is_stored_without_queueing_and_queued_again_as_new_jobs(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    inputs = await upload(api, 3)
    body = {"mode": "automatic", "base_prompt": "as ink", "input_ids": inputs, "variations_per_image": 2}
    saved = await api.post("/api/batches", json={**body, "name": "catalogue"})
    assert saved.status_code == 201, saved.text
    batch = saved.json()
    assert batch["name"] == "catalogue" and batch["mode"] == "automatic" and batch["lane"] == "realtime"
    assert batch["rows"] == 3 and batch["columns"] == ["v0", "v1"] and batch["images"] == 6
    assert batch["jobs"] == [] and batch["latest_job_id"] is None
    assert batch["config"]["input_ids"] == inputs and "name" not in batch["config"]
    assert await fresh_redis.zcard(keys.project_jobs("project-a")) == 0  # nothing queued

    first = await api.post(f"/api/batches/{batch['id']}/jobs", json={})
    second = await api.post(f"/api/batches/{batch['id']}/jobs", json={"priority": 3})
    assert first.status_code == second.status_code == 202, second.text
    first_id, second_id = first.json()["id"], second.json()["id"]
    assert first_id != second_id
    view = (await api.get(f"/api/batches/{batch['id']}")).json()
    assert [job["id"] for job in view["jobs"]] == [second_id, first_id]  # newest first
    assert view["latest_job_id"] == second_id and view["jobs"][0]["priority"] == 3
    assert view["jobs"][1]["priority"] == 10 and view["jobs"][0]["progress"]["images_total"] == 6
    assert await fresh_redis.hget(keys.job(second_id), "batch_id") == batch["id"]

    listed = (await api.get("/api/batches")).json()
    assert [b["id"] for b in listed["batches"]] == [batch["id"]] and listed["next_cursor"] is None
    assert listed["batches"][0]["latest_job_id"] == second_id


async def test_a_batch_is_checked_as_a_job_is(api: httpx.AsyncClient, fresh_redis: Redis) -> None:
    unknown = await api.post(
        "/api/batches",
        json={"mode": "semi_auto", "prompts": ["x"], "reference_ids": ["a" * 32], "images_per_prompt": 2},
    )
    assert unknown.status_code == 422 and "Unknown upload ids" in unknown.json()["detail"]
    nameless = await api.post(
        "/api/batches", json={"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 2, "name": ""}
    )
    assert nameless.status_code == 422
    stray = await api.post("/api/batches", json={"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 2, "x": 1})
    assert stray.status_code == 422
    assert await fresh_redis.keys("bunch:saved-batch:*") == []


async def test_deleting_waits_for_the_batchs_jobs_to_finish(api: httpx.AsyncClient) -> None:
    body = {"mode": "semi_auto", "prompts": ["a", "b"], "images_per_prompt": 4}
    batch_id = (await api.post("/api/batches", json=body)).json()["id"]
    job_id = (await api.post(f"/api/batches/{batch_id}/jobs", json={})).json()["id"]
    refused = await api.delete(f"/api/batches/{batch_id}")
    assert refused.status_code == 409 and job_id in refused.json()["detail"]
    assert (await api.post(f"/api/jobs/{job_id}/cancel")).status_code == 200
    assert (await api.delete(f"/api/batches/{batch_id}")).status_code == 204
    assert (await api.get(f"/api/batches/{batch_id}")).status_code == 404
    assert (await api.delete(f"/api/batches/{batch_id}")).status_code == 404
    gone = await api.post(f"/api/batches/{batch_id}/jobs", json={})
    assert gone.status_code == 404
    # The job stays, with its history.
    assert (await api.get(f"/api/jobs/{job_id}/status")).json()["status"] == "canceled"


async def test_a_batch_deleted_while_it_is_queued_again_leaves_no_job_behind(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    """The create script checks the batch exists in the same call that stores the job: a job is
    never queued from a batch that is gone."""
    body = {"mode": "semi_auto", "prompts": ["a"], "images_per_prompt": 1}
    for _ in range(3):
        batch_id = (await api.post("/api/batches", json=body)).json()["id"]
        queued, deleted = await asyncio.gather(
            api.post(f"/api/batches/{batch_id}/jobs", json={}), api.delete(f"/api/batches/{batch_id}")
        )
        if deleted.status_code == 204:
            assert queued.status_code in (202, 404)
            if queued.status_code == 202:  # queued before the delete looked: then the delete must refuse
                raise AssertionError("a batch with an unfinished job was deleted")
        else:
            assert deleted.status_code == 409 and queued.status_code == 202
            await api.post(f"/api/jobs/{queued.json()['id']}/cancel")
            assert (await api.delete(f"/api/batches/{batch_id}")).status_code == 204
    assert await fresh_redis.zcard(keys.project_saved_batches("project-a")) == 0


async def test_a_project_keeps_at_most_its_limit_of_batches(api: httpx.AsyncClient) -> None:
    body = {"mode": "semi_auto", "prompts": ["a"], "images_per_prompt": 1}
    ids = [(await api.post("/api/batches", json=body)).json()["id"] for _ in range(3)]
    refused = await api.post("/api/batches", json=body)
    assert refused.status_code == 409 and "BUNCH_PROJECT_MAX_SAVED_BATCHES" in refused.json()["detail"]
    page = (await api.get("/api/batches", params={"limit": 2})).json()
    assert [b["id"] for b in page["batches"]] == ids[:0:-1] and page["next_cursor"]
    rest = (await api.get("/api/batches", params={"limit": 2, "cursor": page["next_cursor"]})).json()
    assert [b["id"] for b in rest["batches"]] == ids[:1]
    assert (await api.delete(f"/api/batches/{ids[0]}")).status_code == 204
    assert (await api.post("/api/batches", json=body)).status_code == 201


async def test_a_batch_lists_only_its_newest_jobs(api: httpx.AsyncClient, fresh_redis: Redis) -> None:
    body = {"mode": "semi_auto", "prompts": ["a"], "images_per_prompt": 1}
    batch_id = (await api.post("/api/batches", json=body)).json()["id"]
    job_ids = [(await api.post(f"/api/batches/{batch_id}/jobs", json={})).json()["id"] for _ in range(3)]
    # Fill the list as SAVED_BATCH_JOBS_KEPT earlier jobs would have, older than those three.
    await fresh_redis.zadd(keys.saved_batch_jobs(batch_id), {f"{n:032x}": n for n in range(SAVED_BATCH_JOBS_KEPT)})
    newest = (await api.post(f"/api/batches/{batch_id}/jobs", json={})).json()["id"]
    assert await fresh_redis.zcard(keys.saved_batch_jobs(batch_id)) == SAVED_BATCH_JOBS_KEPT
    kept = await fresh_redis.zrevrange(keys.saved_batch_jobs(batch_id), 0, 3)
    assert kept == [newest, *job_ids[::-1]]


async def test_another_projects_batches_are_not_found(api: httpx.AsyncClient, api_b: httpx.AsyncClient) -> None:
    body = {"mode": "semi_auto", "prompts": ["a"], "images_per_prompt": 1}
    batch_id = (await api.post("/api/batches", json=body)).json()["id"]
    for response in (
        await api_b.get(f"/api/batches/{batch_id}"),
        await api_b.post(f"/api/batches/{batch_id}/jobs", json={}),
        await api_b.delete(f"/api/batches/{batch_id}"),
    ):
        assert response.status_code == 404 and response.json() == {"detail": "No such batch in this project."}
    assert (await api_b.get("/api/batches")).json()["batches"] == []
    assert (await api.get(f"/api/batches/{batch_id}")).status_code == 200
