"""The RunPod handler end to end: real Gemini emulator subprocess, real HTTP for references and outputs."""

import io
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.genai import errors, types
from PIL import Image

from deploy.emulators import gemini as emulator
from deploy.processes import ROOT, free_port
from shared.models import ImageOutcome, RunInput

sys.path.insert(0, str(ROOT / "worker"))
import gemini_client
import handler

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
    await gemini_client.get_client(gemini_client.WorkerSettings.from_env()).aio.aclose()
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
    await runner.cleanup()


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


def job(items: list[dict[str, Any]], aspect_ratio: str | None = None, task: str = "semi_auto_generation") -> dict:
    payload = {
        "task": task, "job_id": "job-1", "run_id": "run-1", "attempt": 1, "model": MODEL,
        "params": {"aspect_ratio": aspect_ratio, "image_size": None}, "items": items,
    }  # fmt: skip
    RunInput.model_validate(payload)  # the dispatcher's contract, so the test can't drift from it
    return {"id": "rp-1", "input": payload}


def item(index: int, prompt: str, refs: list[str], out: str) -> dict[str, Any]:
    return {"index": index, "prompt": prompt, "reference_urls": refs, "output_url": out}


def by_index(result: dict[str, Any]) -> dict[int, dict[str, Any]]:
    images = result["images"]
    for image in images:
        ImageOutcome.model_validate(image)
        assert set(image) == set(ImageOutcome.model_fields)
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
    assert gemini_client.retry_delay_hint(error([{"@type": retry_info, "retryDelay": "37s"}])) == 37.0
    assert (
        gemini_client.retry_delay_hint(error([{"@type": "x.Help"}, {"@type": retry_info, "retryDelay": "0.5s"}])) == 0.5
    )
    assert gemini_client.retry_delay_hint(error([])) is None
    # The hint wins over the exponential schedule, within the cap.
    assert 0.5 <= gemini_client.backoff_delay(1, 1.0, 30.0, hint=0.5) <= 0.55
    assert gemini_client.backoff_delay(1, 1.0, 30.0, hint=37.0) == 30.0
    assert all(gemini_client.backoff_delay(5, 1.0, 30.0) <= 30.0 for _ in range(50))


def test_concurrency_modifier_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "7")
    assert handler.concurrency_modifier(1) == 7
    monkeypatch.delenv("WORKER_CONCURRENCY")
    assert handler.concurrency_modifier(1) == 4


def test_interpret_response_keeps_last_image_and_classifies_failures() -> None:
    def response(body: dict[str, Any]) -> types.GenerateContentResponse:
        return types.GenerateContentResponse.model_validate(body)

    def image_part(data: bytes) -> dict[str, Any]:
        return {"inline_data": {"mime_type": "image/png", "data": data}}

    thought_then_final = response({
        "candidates": [{"content": {"parts": [image_part(b"draft"), {"text": "hm"}, image_part(b"final")]},
                        "finish_reason": "STOP"}],
        "usage_metadata": {"prompt_token_count": 300, "candidates_token_count": 1290},
    })  # fmt: skip
    result = gemini_client.interpret_response(thought_then_final)
    assert result.ok and result.data == b"final"
    assert (result.prompt_tokens, result.output_tokens) == (300, 1290)

    empty = gemini_client.interpret_response(response({"candidates": []}))
    assert (empty.ok, empty.error) == (False, "no_image")
    no_image = gemini_client.interpret_response(response({"candidates": [{"finish_reason": "NO_IMAGE"}]}))
    assert no_image.error == "no_image" and "NO_IMAGE" in (no_image.detail or "")
    prohibited = response({"candidates": [{"content": {"parts": []}, "finish_reason": "IMAGE_PROHIBITED_CONTENT"}]})
    assert gemini_client.interpret_response(prohibited).error == "safety_blocked"
