"""Gemini misbehaving: 429 storms (with a RetryInfo delay), 500 and 503, calls that time out, answers
with text and no image, safety refusals. Each image ends with the right outcome and its reason, and
none of it fails a whole run."""

from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from tests.faults.helpers import assert_nothing_pending, fault_stack, runpod_attempts, submit
from tests.stack_helpers import download_zip, emulator, wait_final

pytestmark = pytest.mark.timeout(90)

MAX_ATTEMPTS = 10
TIMEOUT_SECONDS = 0.3

# Four images per prompt, so each prompt is one run. (prompt, expected status, expected reason(s))
CASES = [
    ("[emu:429x6] a storm of 429s", "succeeded", None),
    ("[emu:500x3] a flaky server", "succeeded", None),
    ("[emu:503x3] an overloaded model", "succeeded", None),
    # Its last error may be a random 429 (below) instead of its own 503s: either class is right.
    ("[emu:503x1000] a model that stays down", "failed", ("upstream_error", "rate_limited")),
    ("[emu:sleep=2000] a call that never answers in time", "failed", ("upstream_error", "rate_limited")),
    ("[emu:text-only] a chatty model", "failed", "no_image"),
    ("[emu:safety] an unsafe picture", "failed", "safety_blocked"),
    ("[emu:blocked] a forbidden prompt", "failed", "safety_blocked"),
    ("a plain fox", "succeeded", None),
]


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # The dispatcher sends these with each run (shared.models.RunLimits).
    limits = {"BUNCH_GEMINI_MAX_ATTEMPTS": str(MAX_ATTEMPTS), "BUNCH_GEMINI_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS)}
    with fault_stack("bunch-gemini-", service_env=limits) as stack:
        yield stack


async def test_each_image_gets_its_outcome_and_reason(stack: Stack, api: httpx.AsyncClient, redis: Redis) -> None:
    # On top of the prompts' own faults, random ones on every call: 429s, 503s and calls that hang.
    # (A good image fails only if all its MAX_ATTEMPTS calls do: about 3e-5.)
    noise = {"rate_limit_rate": 0.2, "error_rate": 0.1, "timeout_rate": 0.05}
    await emulator(stack, "gemini", "POST", "/_emulator/config", noise)
    try:
        job_id = await submit(
            api, {"mode": "semi_auto", "prompts": [prompt for prompt, _, _ in CASES], "images_per_prompt": 4}
        )
        status = await wait_final(api, job_id, stack, within=60)
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {k: 0 for k in noise})
    good = [n for n, (_, outcome, _) in enumerate(CASES) if outcome == "succeeded"]
    assert status["status"] == "completed", status
    assert status["progress"]["images_succeeded"] == 4 * len(good)
    assert status["progress"]["images_failed"] == 4 * (len(CASES) - len(good))

    results = (await api.get(f"/api/jobs/{job_id}/results")).json()["images"]
    for image in results:
        _, outcome, reason = CASES[image["index"] // 4]
        assert image["status"] == outcome, image
        assert image["error"] in reason if isinstance(reason, tuple) else image["error"] == reason, image
        assert (image["url"] is not None) == (outcome == "succeeded"), image
    details = {CASES[i["index"] // 4][0]: i["detail"] for i in results if i["status"] == "failed"}
    # The last of its errors: a 503, or one of the random 429s and 503s.
    assert details[CASES[3][0]].startswith(f"gave up after {MAX_ATTEMPTS} attempts: "), details
    # Its own timeouts, or (last) one of the random 429s, which Gemini answers at once.
    last_error = details[CASES[4][0]].removeprefix(f"gave up after {MAX_ATTEMPTS} attempts: ")
    assert last_error == f"timed out after {TIMEOUT_SECONDS} s" or last_error.startswith("429 "), details
    assert "here is a description" in details[CASES[5][0]], details
    assert details[CASES[6][0]].startswith("finish reason IMAGE_SAFETY"), details
    assert details[CASES[7][0]] == "prompt blocked: PROHIBITED_CONTENT", details

    # Per-image problems are not run failures: each run went to RunPod once.
    assert await runpod_attempts(stack, job_id) == {(f"{job_id}.{n}", 1): 1 for n in range(len(CASES))}
    stats = await emulator(stack, "gemini", "GET", "/_emulator/stats")
    assert {"429", "500", "503"} <= set(stats["by_status"]), stats

    archive = await download_zip(api, job_id)
    expected = [f"{4 * n + i:05d}.png" for n in good for i in range(4)]
    assert sorted(archive.namelist()) == sorted([*expected, "manifest.json"])
    assert archive.testzip() is None
    await assert_nothing_pending(redis)
