"""RunPod's webhook (POST /internal/runpod/webhook?token=...) on the whole real stack: only a token
the dispatcher issued, unaltered and unexpired, with the body of the RunPod job it was issued for,
is passed on; everything else is 401/403 and changes nothing. A callback about a run whose outcome
is already recorded changes nothing either."""

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import EMULATOR_KEY, Stack
from shared import keys, tokens
from tests.security.conftest import KEY_A, WEBHOOK_SECRET
from tests.stack_helpers import client, emulator, submit, wait_final

JOB_FIELDS = ("status", "images_succeeded", "images_failed", "runs_done", "zip_key", "error")


async def runs_of(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """The emulator's record of every RunPod job started for `job_id`, oldest first."""
    return [
        job for job in await emulator(stack, "runpod", "GET", "/_emulator/jobs") if job["input"]["job_id"] == job_id
    ]


async def real_body(stack: Stack, record: dict[str, Any]) -> dict[str, Any]:
    """What RunPod posts for this job: its /status body, plus the input and webhook it was given."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {EMULATOR_KEY}"}) as raw:
        response = await raw.get(f"{stack.runpod_url}/v2/local/status/{record['id']}")
    response.raise_for_status()
    return {**response.json(), "input": record["input"], "webhook": record["webhook"]}


def token_of(record: dict[str, Any]) -> str:
    return parse_qs(urlsplit(record["webhook"]).query)["token"][0]


async def state(redis: Redis, job_id: str) -> tuple[Any, ...]:
    return (
        await redis.xlen(keys.TASK_RESULTS_STREAM),
        await redis.hmget(keys.job(job_id), JOB_FIELDS),
        await redis.hgetall(keys.job_images(job_id)),
    )


async def post(stack: Stack, token: str | None, body: Any) -> httpx.Response:
    params = {} if token is None else {"token": token}
    async with httpx.AsyncClient(base_url=stack.gateway_url) as raw:
        return await raw.post("/internal/runpod/webhook", params=params, json=body)


@pytest.fixture(scope="module")
async def finished(full_stack: Stack) -> dict[str, Any]:
    """A completed job of two runs, with what RunPod sent for each."""
    async with client(full_stack, KEY_A) as api:
        job_id = await submit(api, {"mode": "semi_auto", "prompts": ["two runs"], "images_per_prompt": 8})
        final = await wait_final(api, job_id, full_stack, within=60)
    assert final["status"] == "completed" and final["progress"]["runs_done"] == 2, final
    records = await runs_of(full_stack, job_id)
    assert [r["status"] for r in records] == ["COMPLETED", "COMPLETED"], records
    return {"job_id": job_id, "records": records, "bodies": [await real_body(full_stack, r) for r in records]}


def altered(token: str, part: int, value: str) -> str:
    parts = token.split(tokens.SEPARATOR)
    parts[part] = value
    return tokens.SEPARATOR.join(parts)


async def test_tokens_not_issued_as_they_are_are_refused_and_change_nothing(
    full_stack: Stack, full_redis: Redis, finished: dict[str, Any]
) -> None:
    first, second = finished["records"]
    token = token_of(first)
    run_id, attempt, claim, expires, _ = token.split(tokens.SEPARATOR)
    other_run = second["input"]["run_id"]
    body = finished["bodies"][0]
    before = await state(full_redis, finished["job_id"])
    cases: list[tuple[str, str | None, int]] = [
        ("missing", None, 401),
        ("empty", "", 401),
        ("garbage", "nonsense", 403),
        ("signed with another secret", tokens.issue("not-the-secret", run_id, int(attempt), claim, 3600), 403),
        ("expired", tokens.issue(WEBHOOK_SECRET, run_id, int(attempt), claim, -60), 403),
        ("attempt altered", altered(token, 1, str(int(attempt) + 1)), 403),
        ("claim altered", altered(token, 2, "0" * len(claim)), 403),
        ("claim dropped", tokens.SEPARATOR.join((run_id, attempt, expires, token.rsplit(tokens.SEPARATOR, 1)[1])), 403),
        ("run altered", altered(token, 0, other_run), 403),
        ("expiry extended", altered(token, 3, str(int(expires) + 3600)), 403),
        ("signature cut", token[:-1], 403),
    ]
    for case, bad, expected in cases:
        response = await post(full_stack, bad, body)
        assert response.status_code == expected, (case, response.status_code, response.text)
        assert "token" in response.json()["detail"], case
    assert await state(full_redis, finished["job_id"]) == before


async def test_a_valid_token_cannot_carry_another_runs_body(
    full_stack: Stack, full_redis: Redis, finished: dict[str, Any]
) -> None:
    # While the runs are live: slow images keep both runs of a job in flight.
    await emulator(full_stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 4000})
    try:
        async with client(full_stack, KEY_A) as api:
            job_id = await submit(api, {"mode": "semi_auto", "prompts": ["two live runs"], "images_per_prompt": 8})
            deadline = asyncio.get_running_loop().time() + 20
            while len(records := await runs_of(full_stack, job_id)) < 2 or not all(
                [await full_redis.hget(keys.run(r["input"]["run_id"]), "runpod_id") for r in records]
            ):
                assert asyncio.get_running_loop().time() < deadline, records
                await asyncio.sleep(0.05)
            first, second = records
            before = await state(full_redis, job_id)
            response = await post(full_stack, token_of(first), await real_body(full_stack, second))
            assert response.status_code == 403 and "another RunPod job" in response.json()["detail"]
            assert await state(full_redis, job_id) == before
            await api.post(f"/api/jobs/{job_id}/cancel")
    finally:
        await emulator(full_stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})
    # Once the job is finished (and archived, its run records gone), such a body is not passed on.
    first, _ = finished["records"]
    before = await state(full_redis, finished["job_id"])
    response = await post(full_stack, token_of(first), finished["bodies"][1])
    assert response.status_code in (200, 403) and response.json().get("accepted") is not True
    assert await state(full_redis, finished["job_id"]) == before


async def test_a_webhook_for_a_run_already_final_changes_nothing(
    full_stack: Stack, full_redis: Redis, finished: dict[str, Any]
) -> None:
    before = await state(full_redis, finished["job_id"])
    for record, body in zip(finished["records"], finished["bodies"], strict=True):
        for _ in range(2):  # RunPod retries, duplicates
            response = await post(full_stack, token_of(record), body)
            assert response.status_code == 200, response.text
            assert response.json()["accepted"] is False
    assert await state(full_redis, finished["job_id"]) == before
    async with client(full_stack, KEY_A) as api:
        status = (await api.get(f"/api/jobs/{finished['job_id']}/status")).json()
    assert status["status"] == "completed" and status["progress"]["images_succeeded"] == 8


async def test_a_run_in_flight_cannot_be_settled_with_another_runs_results(
    full_stack: Stack, full_redis: Redis, finished: dict[str, Any]
) -> None:
    async with client(full_stack, KEY_A) as api:
        job_id = await submit(api, {"mode": "semi_auto", "prompts": ["[emu:sleep=4000] slow"], "images_per_prompt": 1})
        run_id = keys.run_id(job_id, 0)
        deadline = time.monotonic() + 20
        while not await full_redis.hget(keys.run(run_id), "runpod_id"):  # RunPod has it, and we know its id
            assert time.monotonic() < deadline, "the run did not start"
            await asyncio.sleep(0.05)
        (record,) = await runs_of(full_stack, job_id)
        assert record["status"] in ("IN_QUEUE", "IN_PROGRESS")
        before = await state(full_redis, job_id)
        # The completed body of another run, under this run's valid token: without the check it
        # would settle this run with another run's images.
        response = await post(full_stack, token_of(record), finished["bodies"][0])
        assert response.status_code == 403, response.text
        assert await state(full_redis, job_id) == before
        final = await wait_final(api, job_id, full_stack, within=40)
    assert final["status"] == "completed" and final["progress"]["images_succeeded"] == 1, final
