"""The RunPod handler end to end: real Gemini emulator subprocess, real HTTP for references and outputs.

The failure classifier is also tested on its own, with the SDK's real exception and response classes
built from the documented JSON bodies.
"""

import asyncio
import io
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from google.genai import errors, types
from PIL import Image

from deploy.emulators import gemini as emulator
from deploy.processes import ROOT, base_env, free_port, python
from shared.models import FailureReason, ImageOutcome, RunInput

sys.path.insert(0, str(ROOT / "worker"))
import failures
import gemini_client
import handler
import worker_settings
from failures import Retry

MODEL = "gemini-2.5-flash-image"


def png_bytes(color: str, size: tuple[int, int] = (48, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Storage:
    """What a presigned-URL object store saw: GETs per object, PUT bodies and their content types."""

    url: str
    objects: dict[str, bytes] = field(default_factory=dict)
    gets: Counter[str] = field(default_factory=Counter)
    puts: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    put_attempts: Counter[str] = field(default_factory=Counter)
    # "slow" objects are held until this is set (at teardown), far past any budget under test.
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def ref(self, name: str) -> str:
        return f"{self.url}/ref/{name}?X-Amz-Signature=secret"

    def out(self, name: str) -> str:
        return f"{self.url}/out/{name}?X-Amz-Signature=secret"

    def reset(self) -> None:
        self.gets.clear()
        self.puts.clear()
        self.put_attempts.clear()


def storage_app(store: Storage) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        store.gets[name] += 1
        if name.startswith("slow"):
            await store.release.wait()
        if name.startswith("flaky") and store.gets[name] == 1:
            return web.Response(status=503)
        if name not in store.objects:
            return web.Response(status=404)
        return web.Response(body=store.objects[name], content_type="application/octet-stream")

    async def put(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        store.put_attempts[name] += 1
        if name.startswith("flaky") and store.put_attempts[name] == 1:
            return web.Response(status=500)
        store.puts[name] = (await request.read(), request.headers.get("Content-Type", ""))
        return web.Response(status=200)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/ref/{name}", get)
    app.router.add_put("/out/{name}", put)
    return app


@pytest.fixture(scope="module")
def gemini_url(workdir: Path) -> Iterator[str]:
    proc, url = emulator.start(workdir)
    yield url
    proc.stop()


@pytest.fixture(scope="module")
async def worker_env(gemini_url: str) -> AsyncIterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("GEMINI_API_KEY", "emulator-key")
    patch.setenv("GEMINI_BASE_URL", gemini_url)
    patch.setenv("GEMINI_MAX_ATTEMPTS", "3")
    patch.setenv("GEMINI_BACKOFF_MAX_SECONDS", "0.05")
    patch.setenv("TRANSFER_MAX_ATTEMPTS", "3")
    patch.setenv("TRANSFER_BACKOFF_MAX_SECONDS", "0.05")
    # get_client builds a new client for a new key or base URL: the handler picks this env up.
    yield
    await gemini_client.get_client(worker_settings.WorkerSettings.from_env()).aio.aclose()
    patch.undo()


@pytest.fixture(scope="module")
async def store() -> AsyncIterator[Storage]:
    port = free_port()
    store = Storage(url=f"http://127.0.0.1:{port}")
    store.objects = {"a.png": png_bytes("red"), "b.png": png_bytes("green"), "flaky.png": png_bytes("blue")}
    runner = web.AppRunner(storage_app(store))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield store
    store.release.set()
    await runner.cleanup()


@pytest.fixture(scope="module")
def keyed_gemini_url(workdir: Path) -> Iterator[str]:
    """A second emulator that accepts only one key (its --api-key flag)."""
    logs = workdir / "keyed-gemini"
    logs.mkdir(exist_ok=True)
    proc, url = emulator.start(logs, api_keys=["the-right-key"])
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
async def fresh(worker_env: None, store: Storage, gemini_url: str) -> None:
    store.reset()
    async with aiohttp.ClientSession() as http:
        await http.post(gemini_url + "/_emulator/reset")


async def emulator_stats(gemini_url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(gemini_url + "/_emulator/stats") as resp:
        return dict(await resp.json())


async def emulator_statuses(gemini_url: str) -> dict[str, int]:
    return dict((await emulator_stats(gemini_url))["by_status"])


def job(
    items: list[dict[str, Any]],
    aspect_ratio: str | None = None,
    task: str = "semi_auto_generation",
    limits: dict[str, float] | None = None,
    model: str = MODEL,
) -> dict:
    payload = {
        "task": task, "job_id": "job-1", "run_id": "run-1", "attempt": 1, "model": model,
        "params": {"aspect_ratio": aspect_ratio, "image_size": None}, "items": items,
    }  # fmt: skip
    if limits is not None:
        payload["limits"] = limits
    RunInput.model_validate(payload)  # the dispatcher's contract, so the test can't drift from it
    return {"id": "rp-1", "input": payload}


def item(index: int, prompt: str, refs: list[str], out: str) -> dict[str, Any]:
    return {"index": index, "prompt": prompt, "reference_urls": refs, "output_url": out}


def limits(timeout: float, attempts: int, backoff_max: float, budget: float) -> dict[str, float]:
    return {
        "gemini_timeout_seconds": timeout, "gemini_max_attempts": attempts,
        "gemini_backoff_max_seconds": backoff_max, "budget_seconds": budget,
    }  # fmt: skip


def by_index(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    images = result["images"]
    for image in images:
        ImageOutcome.model_validate(image)
        assert set(image) == set(ImageOutcome.model_fields)
        # Every failure class is one the dispatcher knows.
        assert image["error"] is None or FailureReason(image["error"])
    return {image["index"]: image for image in images}


async def test_all_items_succeed(store: Storage) -> None:
    tag = uuid.uuid4().hex
    items = [
        item(2, f"two refs {tag}", [store.ref("a.png"), store.ref("b.png")], store.out("2.png")),
        item(0, f"a cat {tag}", [store.ref("a.png")], store.out("0.png")),
        item(1, f"a dog {tag}", [store.ref("a.png")], store.out("1.png")),
    ]
    result = await handler.handler(job(items, aspect_ratio="16:9"))

    assert [image["index"] for image in result["images"]] == [0, 1, 2]
    outcomes = by_index(result)
    for spec in items:
        outcome = outcomes[spec["index"]]
        assert outcome["status"] == "succeeded", outcome
        assert outcome["error"] is None and outcome["mime_type"] == "image/png"
        body, content_type = store.puts[f"{spec['index']}.png"]
        assert content_type == "image/png"
        assert outcome["bytes"] == len(body)
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "PNG" and image.size == (256, 144)  # aspect ratio reached Gemini
        # The emulator charges 258 tokens per input image: proves each item sent exactly its references.
        assert outcome["prompt_tokens"] == len(spec["prompt"]) // 4 + 258 * len(spec["reference_urls"])
        assert outcome["output_tokens"] == 1290
    assert store.gets == Counter({"a.png": 1, "b.png": 1})  # each distinct reference downloaded once
    assert len({store.puts[name][0] for name in store.puts}) == 3


async def test_automatic_task_with_input_image(store: Storage) -> None:
    result = await handler.handler(
        job([item(0, "make it autumn", [store.ref("b.png")], store.out("auto.png"))], task="automatic_generation")
    )
    assert by_index(result)[0]["status"] == "succeeded"
    assert Image.open(io.BytesIO(store.puts["auto.png"][0])).size == (256, 256)


async def test_rate_limited_item_succeeds_after_retries(store: Storage, gemini_url: str) -> None:
    prompt = f"busy {uuid.uuid4().hex} [emu:429x2]"
    result = await handler.handler(job([item(0, prompt, [store.ref("a.png")], store.out("r.png"))]))
    assert by_index(result)[0]["status"] == "succeeded"
    assert "r.png" in store.puts
    assert await emulator_statuses(gemini_url) == {"429": 2, "200": 1}


async def test_retry_waits_for_the_servers_retry_info(
    store: Storage, gemini_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exponential backoff alone would wait 1.5-3 s here; the emulator's RetryInfo says 0.2 s.
    monkeypatch.setenv("GEMINI_BACKOFF_MAX_SECONDS", "5")
    monkeypatch.setenv("GEMINI_BACKOFF_BASE_SECONDS", "3")
    started = time.monotonic()
    prompt = f"busy {uuid.uuid4().hex} [emu:429x1]"
    result = await handler.handler(job([item(0, prompt, [], store.out("hint.png"))]))
    elapsed = time.monotonic() - started
    assert by_index(result)[0]["status"] == "succeeded"
    assert 0.2 <= elapsed < 1.2  # slack for a busy machine, still well short of the backoff


async def test_per_image_failures_do_not_fail_the_run(store: Storage, gemini_url: str) -> None:
    tag = uuid.uuid4().hex
    items = [
        item(0, f"fine {tag}", [], store.out("ok.png")),
        item(1, f"[emu:safety] {tag}", [], store.out("safety.png")),
        item(2, f"[emu:blocked] {tag}", [], store.out("blocked.png")),
        item(3, f"[emu:text-only] {tag}", [], store.out("text.png")),
        item(4, f"[emu:500x99] {tag}", [], store.out("broken.png")),
    ]
    outcomes = by_index(await handler.handler(job(items)))

    assert outcomes[0]["status"] == "succeeded"
    expected = {1: "safety_blocked", 2: "safety_blocked", 3: "no_image", 4: "upstream_error"}
    for index, reason in expected.items():
        assert outcomes[index]["status"] == "failed"
        assert outcomes[index]["error"] == reason, outcomes[index]
        assert outcomes[index]["detail"]
        assert outcomes[index]["bytes"] is None
    assert "IMAGE_SAFETY" in outcomes[1]["detail"]
    assert "500" in outcomes[4]["detail"]
    assert set(store.puts) == {"ok.png"}  # nothing is uploaded for a failed image
    statuses = await emulator_statuses(gemini_url)
    assert statuses["500"] == 3  # GEMINI_MAX_ATTEMPTS, then it gives up
    assert statuses["200"] == 4


async def test_gemini_timeout_is_retried_then_upstream_error(
    store: Storage, gemini_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_TIMEOUT_SECONDS", "0.3")
    started = time.monotonic()
    result = await handler.handler(job([item(0, "slow [emu:sleep=1500]", [], store.out("slow.png"))]))
    outcome = by_index(result)[0]
    assert outcome["error"] == "upstream_error" and "timed out" in outcome["detail"]
    assert time.monotonic() - started < 2.5
    stats = await emulator_stats(gemini_url)
    assert stats["calls"] == 3 and stats["by_status"] == {}  # 3 attempts sent, none answered in time


async def test_items_run_concurrently(store: Storage) -> None:
    items = [item(i, f"slow {i} [emu:sleep=1000]", [], store.out(f"c{i}.png")) for i in range(4)]
    started = time.monotonic()
    result = await handler.handler(job(items))
    assert all(image["status"] == "succeeded" for image in result["images"])
    assert time.monotonic() - started < 2.5  # serial would take 4 s


async def test_transient_storage_errors_are_retried(store: Storage) -> None:
    result = await handler.handler(
        job([item(0, "flaky storage", [store.ref("flaky.png")], store.out("flaky-out.png"))])
    )
    assert by_index(result)[0]["status"] == "succeeded"
    assert store.gets["flaky.png"] == 2 and store.put_attempts["flaky-out.png"] == 2
    assert store.puts["flaky-out.png"][1] == "image/png"


async def test_unreachable_output_fails_the_run(store: Storage) -> None:
    dead = f"http://127.0.0.1:{free_port()}/out/x.png?X-Amz-Signature=secret"
    items = [item(0, "lost", [], dead), item(1, "kept", [], store.out("kept.png"))]
    with pytest.raises(handler.TransferError) as caught:
        await handler.handler(job(items))
    assert "PUT" in str(caught.value) and "secret" not in str(caught.value)


async def test_missing_reference_fails_the_run(store: Storage) -> None:
    with pytest.raises(handler.TransferError, match="404"):
        await handler.handler(job([item(0, "x", [store.ref("nope.png")], store.out("n.png"))]))
    assert store.gets["nope.png"] == 1  # a 404 is not retried


async def test_invalid_input_raises() -> None:
    with pytest.raises(ValueError):
        await handler.handler({"id": "x", "input": {"task": "semi_auto_generation"}})


def test_retry_delay_hint_from_retry_info() -> None:
    def error(details: list[dict[str, Any]]) -> errors.ClientError:
        body = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "m", "details": details}}
        return errors.ClientError(429, body)

    retry_info = "type.googleapis.com/google.rpc.RetryInfo"
    assert failures.retry_delay_hint(error([{"@type": retry_info, "retryDelay": "37s"}])) == 37.0
    assert failures.retry_delay_hint(error([{"@type": "x.Help"}, {"@type": retry_info, "retryDelay": "0.5s"}])) == 0.5
    assert failures.retry_delay_hint(error([])) is None
    # The hint wins over the exponential schedule, within the cap.
    assert 0.5 <= gemini_client.backoff_delay(1, 1.0, 30.0, hint=0.5) <= 0.55
    assert gemini_client.backoff_delay(1, 1.0, 30.0, hint=37.0) == 30.0
    assert all(gemini_client.backoff_delay(5, 1.0, 30.0) <= 30.0 for _ in range(50))


def test_concurrency_modifier_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "7")
    assert handler.concurrency_modifier(1) == 7
    monkeypatch.delenv("WORKER_CONCURRENCY")
    assert handler.concurrency_modifier(1) == 4


# --- the classifier, on the SDK's own classes ------------------------------------------------------------

RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
HELP = "type.googleapis.com/google.rpc.Help"
PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
PER_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


def api_error(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> errors.APIError:
    """What google/genai/errors.py raises for a non-200 answer with this documented JSON body."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, "status": status}}
    if details is not None:
        body["error"]["details"] = details
    return errors.ClientError(code, body) if code < 500 else errors.ServerError(code, body)


def quota_429(*quota_ids: str, retry_delay: str = "37s") -> errors.APIError:
    violations = [
        {"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests", "quotaId": quota_id,
         "quotaDimensions": {"location": "global", "model": MODEL}, "quotaValue": "10"}
        for quota_id in quota_ids
    ]  # fmt: skip
    help_link = {"description": "Learn more", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}
    details: list[dict[str, Any]] = [
        {"@type": QUOTA_FAILURE, "violations": violations},
        {"@type": HELP, "links": [help_link]},
        {"@type": RETRY_INFO, "retryDelay": retry_delay},
    ]
    return api_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan.", details)


def test_per_minute_429_is_rate_limited_and_retried_after_retry_info() -> None:
    failure = failures.classify_error(quota_429(PER_MINUTE))
    assert (failure.reason, failure.retry, failure.retry_after) == ("rate_limited", Retry.BACKOFF, 37.0)
    assert PER_MINUTE in failure.detail
    bare = failures.classify_error(api_error(429, "RESOURCE_EXHAUSTED", "Resource exhausted."))
    assert (bare.reason, bare.retry, bare.retry_after) == ("rate_limited", Retry.BACKOFF, None)


def test_daily_quota_429_is_final() -> None:
    for error in (quota_429(PER_DAY), quota_429(PER_MINUTE, PER_DAY)):
        failure = failures.classify_error(error)
        assert (failure.reason, failure.retry) == ("quota_exhausted", Retry.NEVER)
        assert PER_DAY in failure.detail and "midnight Pacific" in failure.detail
        assert failure.reason in failures.RUN_WIDE_REASONS


def test_key_permission_and_billing_errors_are_auth_failed() -> None:
    no_key = api_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
    unauthenticated = api_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
    bad_key = api_error(
        400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
        [{"@type": ERROR_INFO, "reason": "API_KEY_INVALID", "domain": "googleapis.com",
          "metadata": {"service": "generativelanguage.googleapis.com"}}],
    )  # fmt: skip
    billing = api_error(
        400, "FAILED_PRECONDITION", "Gemini API free tier is not available in your country. Please enable billing."
    )
    for error in (no_key, unauthenticated, bad_key, billing):
        failure = failures.classify_error(error)
        assert (failure.reason, failure.retry) == ("auth_failed", Retry.NEVER), error
        assert str(error.code) in failure.detail
    assert "API_KEY_INVALID" in failures.classify_error(bad_key).detail
    assert "FAILED_PRECONDITION" in failures.classify_error(billing).detail


def test_unknown_model_and_invalid_argument_are_bad_requests() -> None:
    unknown_model = api_error(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta.")
    bad_ratio = api_error(400, "INVALID_ARGUMENT", "Invalid value at 'generation_config.image_config.aspect_ratio'")
    for error in (unknown_model, bad_ratio):
        failure = failures.classify_error(error)
        assert (failure.reason, failure.retry) == ("bad_request", Retry.NEVER)
    assert "gemini-9" in failures.classify_error(unknown_model).detail


def test_server_errors_timeouts_and_connection_errors_are_retried_upstream_errors() -> None:
    transient: list[BaseException] = [
        api_error(500, "INTERNAL", "An internal error has occurred."),
        api_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        api_error(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        TimeoutError(),
        httpx.ReadTimeout("read timed out"),
        aiohttp.ServerDisconnectedError(),
        httpx.ConnectError("connection refused"),
    ]
    for exc in transient:
        failure = failures.classify_error(exc, timeout=2.5)
        assert (failure.reason, failure.retry) == ("upstream_error", Retry.BACKOFF), exc
    assert failures.classify_error(TimeoutError(), timeout=2.5).detail == "timed out after 2.5 s"
    # Not a network problem: the same call would break the same way.
    odd = failures.classify_error(ValueError("unparseable response"))
    assert (odd.reason, odd.retry) == ("upstream_error", Retry.NEVER)


def test_details_are_short() -> None:
    long = api_error(400, "INVALID_ARGUMENT", "x" * 5000)
    assert len(failures.classify_error(long).detail) <= failures.DETAIL_MAX_CHARS
    text_only = response({"candidates": [{"content": {"parts": [{"text": "y " * 3000}]}, "finish_reason": "STOP"}]})
    outcome = failures.classify_response(text_only)
    assert isinstance(outcome, failures.Failure) and len(outcome.detail) <= failures.DETAIL_MAX_CHARS


def response(body: dict[str, Any]) -> types.GenerateContentResponse:
    return types.GenerateContentResponse.model_validate(body)


def image_part(data: bytes, thought: bool | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"inline_data": {"mime_type": "image/png", "data": data}}
    if thought is not None:
        part["thought"] = thought
    return part


def test_last_non_thought_image_is_the_answer() -> None:
    def answer(*parts: dict[str, Any]) -> failures.GeneratedImage | failures.Failure:
        body = {"candidates": [{"content": {"parts": list(parts)}, "finish_reason": "STOP"}]}
        return failures.classify_response(response(body))

    cases = [
        ((image_part(b"draft"), {"text": "hm"}, image_part(b"final")), b"final"),
        ((image_part(b"draft", thought=True), image_part(b"final", thought=False)), b"final"),
        ((image_part(b"final"), image_part(b"late draft", thought=True)), b"final"),
    ]
    for parts, expected in cases:
        outcome = answer(*parts)
        assert isinstance(outcome, failures.GeneratedImage) and outcome.data == expected, parts

    thought_only = answer(image_part(b"draft 1", thought=True), image_part(b"draft 2", thought=True))
    assert isinstance(thought_only, failures.Failure)
    assert thought_only.reason == "no_image" and "thought" in thought_only.detail


@pytest.mark.parametrize(
    ("body", "reason", "retry"),
    [
        ({"candidates": []}, "no_image", Retry.NEVER),
        ({"candidates": [{"content": {"parts": [{"text": "a description"}]}, "finish_reason": "STOP"}]},
         "no_image", Retry.NEVER),
        ({"candidates": [{"finish_reason": "MAX_TOKENS"}]}, "no_image", Retry.NEVER),
        ({"candidates": [{"finish_reason": "NO_IMAGE"}]}, "no_image", Retry.ONCE),
        ({"candidates": [{"finish_reason": "IMAGE_OTHER"}]}, "no_image", Retry.ONCE),
        ({"prompt_feedback": {"block_reason": "PROHIBITED_CONTENT"}}, "safety_blocked", Retry.NEVER),
        *[({"candidates": [{"content": {"parts": []}, "finish_reason": finish}]}, "safety_blocked", Retry.NEVER)
          for finish in ("IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST",
                         "SPII", "IMAGE_RECITATION", "RECITATION")],
    ],
)  # fmt: skip
def test_answers_without_an_image_are_classified(body: dict[str, Any], reason: str, retry: Retry) -> None:
    outcome = failures.classify_response(response(body))
    assert isinstance(outcome, failures.Failure)
    assert (outcome.reason, outcome.retry) == (reason, retry)
    finish = body.get("candidates", [{}])[0].get("finish_reason") if body.get("candidates") else None
    assert finish is None or finish in outcome.detail


def test_per_call_timeout_reaches_the_sdk() -> None:
    # The shared client's timeout is frozen at build time; a run's limits may allow a longer call.
    config = gemini_client.build_config(None, None, timeout_seconds=2.5)
    assert config.http_options is not None and config.http_options.timeout == 3500


# --- the run's limits ------------------------------------------------------------------------------------


async def test_limits_override_the_environment(store: Storage, gemini_url: str) -> None:
    # The env says 3 attempts and a 120 s timeout; the run's limits say 2 attempts of 0.3 s.
    started = time.monotonic()
    items = [
        item(0, f"slow {uuid.uuid4().hex} [emu:sleep=3000]", [], store.out("l0.png")),
        item(1, f"broken {uuid.uuid4().hex} [emu:500x99]", [], store.out("l1.png")),
    ]
    outcomes = by_index(await handler.handler(job(items, limits=limits(0.3, 2, 0.05, 30))))
    assert outcomes[0]["error"] == "upstream_error" and "timed out after 0.3 s" in outcomes[0]["detail"]
    assert outcomes[1]["error"] == "upstream_error" and "gave up after 2 attempts" in outcomes[1]["detail"]
    assert time.monotonic() - started < 2.5
    stats = await emulator_stats(gemini_url)
    assert stats["calls"] == 4 and stats["by_status"] == {"500": 2}


async def test_budget_ends_the_run_in_time(store: Storage, gemini_url: str) -> None:
    started = time.monotonic()
    prompt = f"hangs {uuid.uuid4().hex} [emu:sleep=5000]"
    result = await handler.handler(job([item(0, prompt, [], store.out("b.png"))], limits=limits(1, 5, 0.05, 3)))
    elapsed = time.monotonic() - started
    outcome = by_index(result)[0]
    assert outcome["error"] == "upstream_error", outcome
    assert "time budget of 3 s" in outcome["detail"] and "timed out" in outcome["detail"]
    # 1 s attempts fill the budget (the last cut to what is left); none is started that could not finish.
    assert 2.0 <= elapsed < 3.5
    assert 2 <= (await emulator_stats(gemini_url))["calls"] <= 3


async def test_budget_bounds_reference_downloads(store: Storage, gemini_url: str) -> None:
    store.objects["slow.png"] = png_bytes("gray")
    started = time.monotonic()
    with pytest.raises(handler.TransferError, match="timed out"):
        await handler.handler(
            job([item(0, "x", [store.ref("slow.png")], store.out("s.png"))], limits=limits(1, 3, 0.05, 1))
        )
    assert time.monotonic() - started < 1.5
    assert (await emulator_stats(gemini_url))["calls"] == 0


# --- refusing to start -----------------------------------------------------------------------------------


def test_fitness_check_refuses_a_missing_key_or_a_malformed_number(monkeypatch: pytest.MonkeyPatch) -> None:
    worker_settings.check_fitness()  # the test env is complete
    monkeypatch.setenv("GEMINI_API_KEY", "  ")
    with pytest.raises(RuntimeError, match="GEMINI_API_KEY is not set"):
        worker_settings.check_fitness()
    monkeypatch.setenv("GEMINI_API_KEY", "key")
    for name, value in [("GEMINI_TIMEOUT_SECONDS", "2m"), ("GEMINI_MAX_ATTEMPTS", "0"), ("WORKER_CONCURRENCY", "x")]:
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(ValueError, match=name):
                worker_settings.check_fitness()


def test_worker_without_key_exits_on_runpod(workdir: Path) -> None:
    """The real runpod.serverless.start loop runs the fitness check before taking a job."""
    env = base_env({
        # Only on real RunPod (this variable set) do the checks run; nothing listens on port 9.
        "RUNPOD_WEBHOOK_GET_JOB": "http://127.0.0.1:9/job-take/worker-1",
        # RunPod's own disk/memory checks judge the machine, not this worker.
        "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
    })  # fmt: skip
    env.pop("GEMINI_API_KEY", None)
    done = subprocess.run(
        python(str(ROOT / "worker" / "handler.py")), env=env, cwd=workdir, capture_output=True, timeout=60
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 1, output
    assert "GEMINI_API_KEY is not set" in output


# --- failure classes against the emulator ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "error", "calls", "says"),
    [
        ("[emu:quota-minute]", "rate_limited", 3, "gave up after 3 attempts"),  # GEMINI_MAX_ATTEMPTS
        ("[emu:quota-minutex2]", None, 3, None),
        ("[emu:504x1]", None, 2, None),
        ("[emu:504x99]", "upstream_error", 3, "504 DEADLINE_EXCEEDED"),
        ("[emu:no-imagex1]", None, 2, None),
        ("[emu:no-image]", "no_image", 2, "NO_IMAGE"),  # exactly one retry
        ("[emu:image-otherx1]", None, 2, None),
        ("[emu:image-other]", "no_image", 2, "IMAGE_OTHER"),
        ("[emu:recitation]", "safety_blocked", 1, "IMAGE_RECITATION"),
        ("[emu:max-tokens]", "no_image", 1, "MAX_TOKENS"),
        ("[emu:thought-only]", "no_image", 1, "thought"),
        ("[emu:quota-day]", "quota_exhausted", 1, "PerDay"),
        ("[emu:billing]", "auth_failed", 1, "FAILED_PRECONDITION"),
    ],
)
async def test_emulated_failure_is_classified(
    store: Storage, gemini_url: str, directive: str, error: str | None, calls: int, says: str | None
) -> None:
    prompt = f"{directive} {uuid.uuid4().hex}"
    outcome = by_index(await handler.handler(job([item(0, prompt, [], store.out("f.png"))])))[0]
    assert outcome["error"] == error, outcome
    assert outcome["status"] == ("succeeded" if error is None else "failed")
    assert says is None or says in outcome["detail"], outcome
    assert (await emulator_stats(gemini_url))["calls"] == calls
    assert ("f.png" in store.puts) == (error is None)


async def test_retried_answers_count_every_billed_token(store: Storage) -> None:
    tag = uuid.uuid4().hex
    # Same length, so the same prompt tokens per call; "x0" never applies: one call, one image.
    retried = by_index(await handler.handler(job([item(0, f"[emu:no-imagex1] {tag}", [], store.out("t1.png"))])))
    direct = by_index(await handler.handler(job([item(0, f"[emu:no-imagex0] {tag}", [], store.out("t2.png"))])))
    assert retried[0]["status"] == direct[0]["status"] == "succeeded"
    # The NO_IMAGE answer was billed for its prompt too; it drew nothing.
    assert retried[0]["prompt_tokens"] == 2 * direct[0]["prompt_tokens"] > 0
    assert retried[0]["output_tokens"] == direct[0]["output_tokens"] > 0


async def test_daily_quota_stops_the_rest_of_the_run_but_not_the_next_run(
    store: Storage, gemini_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One call at a time, so the first answer is in before the other items would be sent.
    monkeypatch.setenv("GEMINI_MAX_PARALLEL", "1")
    tag = uuid.uuid4().hex
    items = [
        item(0, f"[emu:quota-day] {tag}", [], store.out("q0.png")),
        item(1, f"fine {tag}", [], store.out("q1.png")),
        item(2, f"fine too {tag}", [store.ref("a.png")], store.out("q2.png")),
    ]
    outcomes = by_index(await handler.handler(job(items)))
    assert {o["error"] for o in outcomes.values()} == {"quota_exhausted"}
    assert "PerDay" in outcomes[0]["detail"] and not outcomes[0]["detail"].startswith("not attempted")
    for index in (1, 2):
        assert outcomes[index]["detail"].startswith("not attempted: ") and "PerDay" in outcomes[index]["detail"]
    stats = await emulator_stats(gemini_url)
    assert stats["calls"] == 1 and stats["by_error"] == {"quota_day": 1}
    assert store.puts == {}

    # The next run tries Gemini again: the quota may have been raised in between.
    result = await handler.handler(job([item(0, f"fine again {tag}", [], store.out("q3.png"))]))
    assert by_index(result)[0]["status"] == "succeeded"
    assert (await emulator_stats(gemini_url))["calls"] == 2


async def test_daily_quota_cuts_short_a_waiting_retry(store: Storage, gemini_url: str) -> None:
    tag = uuid.uuid4().hex
    items = [
        # Per-minute 429s on every call, retried every ~0.2 s (RetryInfo) up to 20 times...
        item(0, f"[emu:quota-minute] {tag}", [], store.out("w0.png")),
        # ...until this answer says the day's quota is gone.
        item(1, f"[emu:quota-day] {tag}", [], store.out("w1.png")),
    ]
    started = time.monotonic()
    outcomes = by_index(await handler.handler(job(items, limits=limits(30, 20, 5, 60))))
    assert time.monotonic() - started < 2.0
    assert outcomes[1]["error"] == "quota_exhausted"
    assert outcomes[0]["error"] == "quota_exhausted" and outcomes[0]["detail"].startswith("not retried after")
    assert (await emulator_stats(gemini_url))["by_error"]["quota_day"] == 1


async def test_invalid_key_fails_the_run_as_auth_failed(
    store: Storage, keyed_gemini_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aiohttp.ClientSession() as http:
        await http.post(keyed_gemini_url + "/_emulator/reset")
    monkeypatch.setenv("GEMINI_BASE_URL", keyed_gemini_url)  # it does not know "emulator-key"
    monkeypatch.setenv("GEMINI_MAX_PARALLEL", "1")
    client = gemini_client.get_client(worker_settings.WorkerSettings.from_env())
    try:
        items = [item(i, f"anything {i}", [], store.out(f"k{i}.png")) for i in range(3)]
        outcomes = by_index(await handler.handler(job(items)))
    finally:
        await client.aio.aclose()
    assert {o["error"] for o in outcomes.values()} == {"auth_failed"}
    assert "API_KEY_INVALID" in outcomes[0]["detail"]
    assert outcomes[2]["detail"].startswith("not attempted: ")
    stats = await emulator_stats(keyed_gemini_url)
    assert stats["calls"] == 1 and stats["by_error"] == {"api_key_invalid": 1}


async def test_unknown_model_is_a_bad_request_for_each_item(store: Storage, gemini_url: str) -> None:
    items = [item(i, f"x {i}", [], store.out(f"m{i}.png")) for i in range(2)]
    outcomes = by_index(await handler.handler(job(items, model="gemini-9-ultra-image")))
    assert {o["error"] for o in outcomes.values()} == {"bad_request"}
    assert "NOT_FOUND" in outcomes[0]["detail"]
    # Not run-wide: another model in another run may work, and each item is asked once, not retried.
    assert (await emulator_stats(gemini_url))["calls"] == 2


async def test_gemini_3_final_image_is_stored_not_the_thought(store: Storage, gemini_url: str) -> None:
    result = await handler.handler(
        job([item(0, f"a fox {uuid.uuid4().hex}", [], store.out("g3.png"))], model="gemini-3-pro-image-preview")
    )
    assert by_index(result)[0]["status"] == "succeeded"
    with Image.open(io.BytesIO(store.puts["g3.png"][0])) as image:
        assert image.format == "PNG"
