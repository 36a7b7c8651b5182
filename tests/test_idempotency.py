"""Idempotency-Key on the creating routes, on two real gateway apps (in process, with their lifespan)
sharing one real redis-server and moto's S3: a repeat gets the first answer and creates nothing,
concurrent repeats create one thing between them, a different request with the key is a 422,
an error frees the key, keys are per project, and a key held by a gateway that died is freed."""

import asyncio
import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.types import Message

from services.gateway.app import create_app
from services.gateway.request_fingerprint import ReadRequest
from shared import keys
from shared.settings import Settings
from shared.stores.idempotency import Claimed, IdempotencyStore, KeyBusy
from tests.stack_helpers import png_bytes

PARALLEL = 50


@pytest.fixture
def app_settings(fresh_redis: Redis, settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + "/9"
    return settings.model_copy(update={"redis_url": url, "idempotency_wait_seconds": 30.0})


async def _client(app_settings: Settings, key: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers) as client:
            yield client


@pytest.fixture
async def api(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(app_settings, "test-key-a"):
        yield client


@pytest.fixture
async def replica(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A second gateway of the same deployment: nothing is shared with the first but Redis."""
    async for client in _client(app_settings, "test-key-a"):
        yield client


@pytest.fixture
async def api_b(app_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(app_settings, "test-key-b"):
        yield client


async def upload(api: httpx.AsyncClient) -> str:
    response = await api.post("/api/uploads", files=[("files", ("r.png", png_bytes(seed=7), "image/png"))])
    assert response.status_code == 201, response.text
    return str(response.json()["uploads"][0]["id"])


def job_body(reference: str, prompt: str = "a red bicycle") -> dict[str, object]:
    return {"mode": "semi_auto", "prompts": [prompt], "reference_ids": [reference], "images_per_prompt": 2}


async def job_count(redis: Redis, project: str) -> int:
    return int(await redis.zcard(keys.project_jobs(project)))


async def test_fifty_parallel_submits_with_one_key_create_one_job(
    api: httpx.AsyncClient, replica: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    body = job_body(await upload(api))
    headers = {"Idempotency-Key": "submit-0b7e"}
    answers = await asyncio.gather(
        *((api if n % 2 else replica).post("/api/jobs", json=body, headers=headers) for n in range(PARALLEL))
    )
    assert {answer.status_code for answer in answers} == {202}, [a.text for a in answers if a.status_code != 202]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert await job_count(fresh_redis, "project-a") == 1
    replayed = [answer for answer in answers if answer.headers.get("Idempotent-Replayed") == "true"]
    assert len(replayed) == PARALLEL - 1
    assert all(answer.headers["Idempotency-Key"] == "submit-0b7e" for answer in answers)
    # The same key tomorrow (within its 24 h) still answers with that job; the record expires then.
    again = await api.post("/api/jobs", json=body, headers=headers)
    assert again.status_code == 202 and again.json() == answers[0].json()
    record = keys.idempotent_request("project-a", hashlib.sha256(b"submit-0b7e").hexdigest())
    assert 23 * 3600 * 1000 < await fresh_redis.pttl(record) <= 24 * 3600 * 1000


async def test_a_json_body_is_the_same_request_whatever_its_spacing_and_key_order(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    reference = await upload(api)
    headers = {"Idempotency-Key": "spacing", "Content-Type": "application/json"}
    first = await api.post(
        "/api/jobs",
        content=b'{"mode": "semi_auto", "prompts": ["x"], "reference_ids": ["'
        + reference.encode()
        + b'"], "images_per_prompt": 1}',
        headers=headers,
    )
    second = await api.post(
        "/api/jobs",
        content=b'{"images_per_prompt":1,"reference_ids":["'
        + reference.encode()
        + b'"],"prompts":["x"],"mode":"semi_auto"}',
        headers=headers,
    )
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    assert await job_count(fresh_redis, "project-a") == 1


async def test_the_same_key_with_another_request_is_a_422_that_creates_nothing(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    reference = await upload(api)
    headers = {"Idempotency-Key": "reused"}
    assert (await api.post("/api/jobs", json=job_body(reference), headers=headers)).status_code == 202
    other_body = await api.post("/api/jobs", json=job_body(reference, "a blue bicycle"), headers=headers)
    assert other_body.status_code == 422
    assert "different request" in other_body.json()["detail"]
    other_route = await api.post("/api/groups", json={"name": "g"}, headers=headers)
    assert other_route.status_code == 422
    assert await job_count(fresh_redis, "project-a") == 1
    assert [group["name"] for group in (await api.get("/api/groups")).json()["groups"]] == ["default"]


async def test_an_error_is_not_kept_and_frees_the_key(api: httpx.AsyncClient, fresh_redis: Redis) -> None:
    reference = await upload(api)
    headers = {"Idempotency-Key": "fix-and-resend"}
    bad = await api.post("/api/jobs", json={**job_body(reference), "images_per_prompt": 0}, headers=headers)
    assert bad.status_code == 422 and "Idempotent-Replayed" not in bad.headers
    fixed = await api.post("/api/jobs", json=job_body(reference), headers=headers)
    assert fixed.status_code == 202 and "Idempotent-Replayed" not in fixed.headers
    assert await job_count(fresh_redis, "project-a") == 1


async def test_keys_belong_to_their_project(
    api: httpx.AsyncClient, api_b: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    headers = {"Idempotency-Key": "shared-name"}
    first = await api.post("/api/jobs", json=job_body(await upload(api)), headers=headers)
    second = await api_b.post("/api/jobs", json=job_body(await upload(api_b)), headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"] and "Idempotent-Replayed" not in second.headers
    assert await job_count(fresh_redis, "project-a") == await job_count(fresh_redis, "project-b") == 1


async def test_a_multipart_upload_sent_again_with_a_new_boundary_is_the_same_request(
    api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    files = [("files", ("a.png", png_bytes(seed=1), "image/png")), ("files", ("b.png", png_bytes(seed=2), "image/png"))]
    headers = {"Idempotency-Key": "upload-twice"}
    # httpx draws a new random boundary for every request, as browsers and other clients do.
    first = await api.post("/api/datasets", files=files, headers=headers)
    second = await api.post("/api/datasets", files=files, headers=headers)
    assert first.status_code == second.status_code == 201, first.text
    assert first.json() == second.json() and second.headers["Idempotent-Replayed"] == "true"
    assert len(await fresh_redis.keys(keys.dataset_inputs("*"))) == 1
    other = await api.post("/api/datasets", files=files[:1], headers=headers)
    assert other.status_code == 422


async def test_a_key_that_is_not_visible_ascii_or_too_long_is_a_400(api: httpx.AsyncClient) -> None:
    for key in ("", "a b", "x" * 256, "clé"):
        response = await api.post("/api/groups", json={"name": "g"}, headers={b"Idempotency-Key": key.encode()})
        assert response.status_code == 400, (key, response.text)
        assert "Idempotency-Key" in response.json()["detail"]
    # The IETF draft's quoted form is the same key.
    quoted = await api.post("/api/groups", json={"name": "g"}, headers={"Idempotency-Key": '"k-1"'})
    plain = await api.post("/api/groups", json={"name": "g"}, headers={"Idempotency-Key": "k-1"})
    assert quoted.status_code == plain.status_code == 201 and plain.headers["Idempotent-Replayed"] == "true"


async def test_a_key_held_by_a_gateway_that_died_answers_409_then_is_freed(
    app_settings: Settings, api: httpx.AsyncClient, fresh_redis: Redis
) -> None:
    body = {"name": "held"}
    answered = await api.post("/api/groups", json=body, headers={"Idempotency-Key": "k-answered"})
    assert answered.status_code == 201
    fingerprint = await fresh_redis.hget(
        keys.idempotent_request("project-a", hashlib.sha256(b"k-answered").hexdigest()), "fingerprint"
    )
    # A gateway claimed "k-held" for this very request and was killed before it answered.
    held = keys.idempotent_request("project-a", hashlib.sha256(b"k-held").hexdigest())
    await fresh_redis.hset(held, mapping={"fingerprint": fingerprint, "token": "dead-gateway"})
    await fresh_redis.pexpire(held, 60_000)
    impatient = app_settings.model_copy(update={"idempotency_wait_seconds": 0.2})
    async for client in _client(impatient, "test-key-a"):
        waiting = await client.post("/api/groups", json=body, headers={"Idempotency-Key": "k-held"})
        assert waiting.status_code == 409 and waiting.headers["Retry-After"] == "1"
        assert "still running" in waiting.json()["detail"]
        await fresh_redis.pexpire(held, 1)  # BUNCH_IDEMPOTENCY_LOCK_SECONDS passed
        await asyncio.sleep(0.01)
        freed = await client.post("/api/groups", json=body, headers={"Idempotency-Key": "k-held"})
        assert freed.status_code == 409 and "already" in freed.json()["detail"]  # the group exists: its own 409


async def test_document_style_routes_answer_key_errors_in_their_style(api: httpx.AsyncClient) -> None:
    batch = await api.post("/api/batches", json={**job_body(await upload(api)), "name": "b"})
    body = {"projectId": "project-a", "batchId": batch.json()["id"]}
    headers = {"Idempotency-Key": "enqueue-1"}
    first = await api.post("/api/queue/enqueue", json=body, headers=headers)
    again = await api.post("/api/queue/enqueue", json=body, headers=headers)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    other = await api.post("/api/queue/enqueue", json={**body, "priority": 3}, headers=headers)
    assert (
        other.status_code == 422 and other.json()["success"] is False and "different request" in other.json()["error"]
    )


async def test_one_claim_wins_among_concurrent_ones_on_separate_connections(redis_url: str, fresh_redis: Redis) -> None:
    """The decision itself, with every claimant's command on the wire at once: one script call, so
    one of them claims and the others see its claim."""
    url = redis_url.rsplit("/", 1)[0] + "/9"
    clients = [Redis.from_url(url, decode_responses=True) for _ in range(PARALLEL)]
    try:
        await asyncio.gather(*(client.ping() for client in clients))  # connected before the race
        stores = [IdempotencyStore(client, ttl_seconds=3600, lock_seconds=60) for client in clients]
        claims = await asyncio.gather(*(store.claim("project-a", "race", "fingerprint-1") for store in stores))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    assert sum(isinstance(claim, Claimed) for claim in claims) == 1
    assert all(isinstance(claim, Claimed | KeyBusy) for claim in claims)


async def test_a_route_of_both_styles_replays_too(api: httpx.AsyncClient) -> None:
    # Its route class reads the body for the style before the key is looked at.
    headers = {"Idempotency-Key": "retry-all-1"}
    first = await api.post("/api/queue/retry", json={"projectId": "project-a", "retryAll": True}, headers=headers)
    again = await api.post("/api/queue/retry", json={"retryAll": True, "projectId": "project-a"}, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    assert first.json()["success"] is True and again.headers["Idempotent-Replayed"] == "true"


async def test_a_created_thing_has_its_location_in_the_answer_and_its_replays(api: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "located"}
    body = job_body(await upload(api))
    first = await api.post("/api/jobs", json=body, headers=headers)
    again = await api.post("/api/jobs", json=body, headers=headers)
    assert first.headers["Location"] == again.headers["Location"] == f"/api/jobs/{first.json()['id']}"
    assert (await api.get(first.headers["Location"])).json()["id"] == first.json()["id"]
    group = await api.post("/api/groups", json={"name": "located"})
    assert group.headers["Location"] == f"/api/groups/{group.json()['id']}"
    assert (await api.get(group.headers["Location"])).status_code == 200


@pytest.mark.parametrize("media_type", ["multipart/form-data; boundary=b0undary", "application/json"])
async def test_a_body_has_one_fingerprint_however_the_network_cut_it(media_type: str) -> None:
    if media_type.startswith("multipart"):
        part = b'Content-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        body = b"--b0undary\r\n" + part + png_bytes(seed=3) + b"\r\n--b0undary--\r\n"
    else:
        body = b'{"mode": "semi_auto", "prompts": ["a red bicycle"], "images_per_prompt": 2}'

    async def fingerprint(cut: int) -> str:
        pieces = [body[at : at + cut] for at in range(0, len(body), cut)]

        async def receive() -> Message:
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/api/uploads",
            "query_string": b"",
            "headers": [(b"content-type", media_type.encode())],
        }
        read = await ReadRequest.read(Request(scope, receive))
        read.close()
        return read.fingerprint

    assert len({await fingerprint(cut) for cut in (1, 7, 100, len(body))}) == 1
