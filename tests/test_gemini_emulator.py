"""The Gemini emulator on the wire: exact bodies and statuses over HTTP (aiohttp), a few calls through the
real google-genai client, and its admin routes. tests/contracts/test_genai_contract.py checks what the
SDK makes of each error and answer."""

import asyncio
import base64
import io
import json
import random
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google import genai
from google.genai import errors, types
from PIL import Image

from deploy.emulators import gemini as emulator
from deploy.emulators.gemini import catalog
from deploy.emulators.gemini.state import JITTER_CAP, jitter_ms
from deploy.processes import free_port

MODEL = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
KEY = "emulator-key"
OTHER_KEY = "second-key"
DEFAULT_CONFIG = {
    "latency_ms": 0, "error_rate": 0.0, "rate_limit_rate": 0.0, "timeout_rate": 0.0,
    "daily_quota_images": 0, "latency_jitter_ms": 0, "image_mode": "small", "revoked_keys": [],
    "batch_pending_seconds": 1.0, "batch_running_seconds": 2.0, "batch_expire_seconds": 172800.0,
    "file_ttl_seconds": 172800.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def gemini_url(workdir: Path) -> Iterator[str]:
    proc, url = emulator.start(workdir, api_keys=[KEY, OTHER_KEY])
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
async def fresh_emulator(gemini_url: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(gemini_url + "/_emulator/reset") as resp:
        assert resp.status == 200


@pytest.fixture(scope="module")
async def client(gemini_url: str) -> AsyncIterator[genai.Client]:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=gemini_url, api_version="v1beta"))
    yield client
    await client.aio.aclose()


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """An emulator app in this process, on a free port, for settings start() does not expose."""
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def png_bytes(size: tuple[int, int] = (32, 32), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def image_part(data: bytes | None = None, mime_type: str = "image/png") -> dict[str, Any]:
    return {"inlineData": {"mimeType": mime_type, "data": base64.b64encode(data or png_bytes()).decode()}}


def request_body(prompt: str = "a fox", *parts: dict[str, Any], **generation: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}, *parts]}]}
    if generation:
        body["generationConfig"] = generation
    return body


async def call(
    url: str, body: Any, *, model: str = MODEL, key: str | None = KEY, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    sent = {"x-goog-api-key": key} if key is not None else {}
    sent.update(headers or {})
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/v1beta/models/{model}:generateContent", json=body, headers=sent) as resp,
    ):
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def admin(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.request(method, f"{url}/_emulator/{path}", json=body) as resp:
        return resp.status, await resp.json()


async def stats(url: str) -> dict[str, Any]:
    return dict((await admin(url, "GET", "stats"))[1])


def inline_images(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in payload["candidates"][0]["content"]["parts"] if "inlineData" in p]


def decoded_size(part: dict[str, Any]) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(part["inlineData"]["data"]))) as image:
        assert image.format == "PNG"
        return image.size


def last_image(response: types.GenerateContentResponse) -> types.Blob | None:
    images = [p.inline_data for p in response.parts or [] if p.inline_data is not None and not p.thought]
    return images[-1] if images else None


# --- through the real client -----------------------------------------------------------------------------


async def test_real_client_gets_png_honouring_aspect_ratio(client: genai.Client, gemini_url: str) -> None:
    prompt = "a red bicycle"
    contents: list[Any] = [prompt, types.Part.from_bytes(data=png_bytes(), mime_type="image/png")]
    response = await client.aio.models.generate_content(
        model=MODEL,
        contents=contents,
        config=types.GenerateContentConfig(
            response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="16:9")
        ),
    )
    blob = last_image(response)
    assert blob is not None and blob.data and blob.mime_type == "image/png"
    with Image.open(io.BytesIO(blob.data)) as image:
        assert image.format == "PNG"
        assert image.size == (256, 144)
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == len(prompt) // 4 + 258  # so the reference image reached the emulator
    assert usage.candidates_token_count == 1290
    assert (await stats(gemini_url))["by_status"] == {"200": 1}


async def test_every_call_draws_a_different_image(client: genai.Client) -> None:
    blobs = [
        last_image(await client.aio.models.generate_content(model=MODEL, contents="same prompt")) for _ in range(2)
    ]
    assert blobs[0] and blobs[1] and blobs[0].data != blobs[1].data


async def test_api_version_v1(gemini_url: str) -> None:
    v1 = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=gemini_url, api_version="v1"))
    try:
        response = await v1.aio.models.generate_content(model=MODEL, contents="a boat")
    finally:
        await v1.aio.aclose()
    blob = last_image(response)
    assert blob is not None and blob.data is not None
    assert Image.open(io.BytesIO(blob.data)).format == "PNG"


async def test_429_directive_then_success(client: genai.Client, gemini_url: str) -> None:
    prompt = f"busy {uuid.uuid4().hex} [emu:429x1]"
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents=prompt)
    assert caught.value.code == 429
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    retry = [d for d in caught.value.details["error"]["details"] if d["@type"].endswith("RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.2s"}]
    response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
    assert last_image(response) is not None
    assert (await stats(gemini_url))["by_status"] == {"429": 1, "200": 1}


# --- wire format -----------------------------------------------------------------------------------------


async def test_raw_snake_case_and_urlsafe_base64(gemini_url: str) -> None:
    # A PNG whose base64 has '-'/'_' in URL-safe form, so a standard-only decoder would reject it.
    ref = next(
        data
        for data in (png_bytes((40 + i, 40), "blue") for i in range(200))
        if set(base64.urlsafe_b64encode(data).decode()) & {"-", "_"}
    )
    urlsafe = base64.urlsafe_b64encode(ref).decode()
    body = {
        "contents": [{"role": "user", "parts": [
            {"text": "snake case"},
            {"inline_data": {"mime_type": "image/png", "data": urlsafe.rstrip("=")}},
        ]}],
        "generation_config": {"response_modalities": ["IMAGE"], "image_config": {"aspect_ratio": "9:16"}},
    }  # fmt: skip
    status, payload = await call(gemini_url, body)
    assert status == 200, payload
    assert payload["usageMetadata"]["promptTokenCount"] == len("snake case") // 4 + 258
    [part] = payload["candidates"][0]["content"]["parts"]
    assert decoded_size(part) == (144, 256)


async def test_success_body_shape(gemini_url: str) -> None:
    body = request_body("a cat in the snow", image_part(), image_part(), responseModalities=["IMAGE"])
    first = await call(gemini_url, body)
    status, payload = await call(gemini_url, body)
    assert status == 200 and first[0] == 200
    assert set(payload) == {"responseId", "modelVersion", "candidates", "usageMetadata"}
    assert payload["modelVersion"] == MODEL
    assert len(payload["responseId"]) >= 16 and payload["responseId"] != first[1]["responseId"]
    assert payload["usageMetadata"] == {
        "promptTokenCount": 4 + 2 * 258,
        "candidatesTokenCount": 1290,
        "totalTokenCount": 4 + 2 * 258 + 1290,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4}, {"modality": "IMAGE", "tokenCount": 516}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}],
    }
    [candidate] = payload["candidates"]
    assert candidate["finishReason"] == "STOP" and candidate["index"] == 0
    assert candidate["content"]["role"] == "model"
    assert [set(p) for p in candidate["content"]["parts"]] == [{"inlineData"}]


async def test_text_part_accompanies_the_image_unless_only_image_is_asked(gemini_url: str) -> None:
    for modalities in (["TEXT", "IMAGE"], ["Text", "Image"], None):
        generation = {"responseModalities": modalities} if modalities else {}
        status, payload = await call(gemini_url, request_body("a kite", **generation))
        assert status == 200, payload
        parts = payload["candidates"][0]["content"]["parts"]
        assert [next(iter(p)) for p in parts] == ["text", "inlineData"], modalities
        details = payload["usageMetadata"]["candidatesTokensDetails"]
        assert [d["modality"] for d in details] == ["TEXT", "IMAGE"]
    status, payload = await call(gemini_url, request_body("a kite", responseModalities=["TEXT"]))
    assert status == 200 and not any("inlineData" in p for p in payload["candidates"][0]["content"]["parts"])


async def test_gemini_3_sends_a_thought_image_before_the_final_one(gemini_url: str) -> None:
    status, payload = await call(
        gemini_url,
        request_body("a lighthouse", responseModalities=["IMAGE"], imageConfig={"imageSize": "2K"}),
        model=PRO,
    )
    assert status == 200, payload
    parts = payload["candidates"][0]["content"]["parts"]
    assert [p.get("thought", False) for p in parts] == [True, False]
    assert all("inlineData" in p for p in parts)
    assert "thoughtSignature" in parts[1] and "thoughtSignature" not in parts[0]
    assert parts[0]["inlineData"]["data"] != parts[1]["inlineData"]["data"]
    usage = payload["usageMetadata"]
    assert usage["candidatesTokenCount"] == 1120
    assert usage["thoughtsTokenCount"] == catalog.THOUGHT_TOKENS
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + 1120 + catalog.THOUGHT_TOKENS
    assert (await stats(gemini_url))["images"] == 1  # the thought image is not a result

    four_k = request_body("a lighthouse", responseModalities=["IMAGE"], imageConfig={"imageSize": "4K"})
    assert (await call(gemini_url, four_k, model=PRO))[1]["usageMetadata"]["candidatesTokenCount"] == 2000
    summary = request_body("x y z", responseModalities=["TEXT", "IMAGE"], thinkingConfig={"includeThoughts": True})
    parts = (await call(gemini_url, summary, model=PRO))[1]["candidates"][0]["content"]["parts"]
    assert [(next(iter(p)), p.get("thought", False)) for p in parts] == [
        ("text", True), ("inlineData", True), ("text", False), ("inlineData", False),
    ]  # fmt: skip


async def test_14_references_are_accepted_by_gemini_3(gemini_url: str) -> None:
    refs = [image_part(png_bytes(color=c)) for c in ["red", "green", "blue", "white", "black", "gray", "pink"] * 2]
    status, payload = await call(gemini_url, request_body("collage", *refs), model=PRO)
    assert status == 200, payload
    assert payload["usageMetadata"]["promptTokensDetails"][1] == {"modality": "IMAGE", "tokenCount": 14 * 258}


# --- keys ------------------------------------------------------------------------------------------------


async def test_no_key_is_403_permission_denied(gemini_url: str) -> None:
    for headers in ({}, {"x-goog-api-key": ""}):
        status, payload = await call(gemini_url, request_body(), key=None, headers=headers)
        assert (status, payload) == (403, {"error": {
            "code": 403,
            "message": "Method doesn't allow unregistered callers (callers without established identity). "
            "Please use API Key or other form of API consumer identity to call this API.",
            "status": "PERMISSION_DENIED",
        }})  # fmt: skip
    status, payload = await call(gemini_url, request_body(), key=None, headers={"Authorization": "Bearer nope"})
    assert (status, payload["error"]["status"]) == (401, "UNAUTHENTICATED")


async def test_unknown_key_is_400_api_key_invalid(gemini_url: str) -> None:
    status, payload = await call(gemini_url, request_body(), key="not-a-key")
    message = "API key not valid. Please pass a valid API key."
    assert (status, payload) == (400, {"error": {
        "code": 400, "message": message, "status": "INVALID_ARGUMENT",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"},
            },
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
        ],
    }})  # fmt: skip
    assert (await call(gemini_url, request_body(), key=OTHER_KEY))[0] == 200
    url = f"{gemini_url}/v1beta/models/{MODEL}:generateContent?key={KEY}"
    async with aiohttp.ClientSession() as http, http.post(url, json=request_body()) as resp:
        assert resp.status == 200  # ?key= works like the header
    assert (await stats(gemini_url))["by_error"] == {"api_key_invalid": 1}


async def test_a_key_revoked_at_run_time_answers_like_an_invalid_one(gemini_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gemini_url}/_emulator/config", json={"revoked_keys": [OTHER_KEY]}) as resp:
            assert resp.status == 200
        status, payload = await call(gemini_url, request_body(), key=OTHER_KEY)
        assert status == 400 and payload["error"]["details"][0]["reason"] == "API_KEY_INVALID", payload
        assert (await call(gemini_url, request_body(), key=KEY))[0] == 200  # other keys still work
        async with http.post(f"{gemini_url}/_emulator/config", json={"revoked_keys": "all"}) as resp:
            assert resp.status == 400


async def test_without_api_key_flag_any_non_empty_key_works() -> None:
    async with serve(emulator.create_app()) as url:
        assert (await call(url, request_body(), key="anything"))[0] == 200
        assert (await call(url, request_body(), key=None))[0] == 403


# --- models and validation -------------------------------------------------------------------------------


async def test_unknown_model_is_404_and_text_model_refuses_images(gemini_url: str) -> None:
    status, payload = await call(gemini_url, request_body(), model="gemini-9-ultra-image")
    assert (status, payload) == (404, {"error": {
        "code": 404, "status": "NOT_FOUND",
        "message": "models/gemini-9-ultra-image is not found for API version v1beta, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their supported methods.",
    }})  # fmt: skip
    status, payload = await call(gemini_url, request_body(responseModalities=["IMAGE"]), model="gemini-2.5-flash")
    assert (status, payload["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert payload["error"]["message"] == "Model does not support the requested response modalities: image"
    status, payload = await call(gemini_url, request_body(), model="gemini-2.5-flash")
    assert status == 200 and "inlineData" not in payload["candidates"][0]["content"]["parts"][0]
    for alias in ("gemini-2.5-flash-image-preview", PRO):
        assert (await call(gemini_url, request_body(), model=alias))[0] == 200


def _with(generation: dict[str, Any] | None = None, parts: list[dict[str, Any]] | None = None, **top: Any) -> Any:
    body = request_body("a tree", *(parts or []))
    if generation is not None:
        body["generationConfig"] = generation
    body.update(top)
    return body


PDF = {"inlineData": {"mimeType": "application/pdf", "data": base64.b64encode(b"%PDF-1.7 ...").decode()}}
INVALID: list[tuple[str, str, Any, str]] = [
    ("aspect ratio", MODEL, _with({"imageConfig": {"aspectRatio": "7:3"}}), "Unsupported aspect ratio: \"7:3\""),
    ("imageSize on flash", MODEL, _with({"imageConfig": {"imageSize": "1K"}}), "Image size is not supported"),
    ("lowercase k", PRO, _with({"imageConfig": {"imageSize": "4k"}}), "Unsupported image size: \"4k\""),
    ("4 refs on flash", MODEL, _with(parts=[image_part()] * 4), "Too many input images: 4"),
    ("15 refs on pro", PRO, _with(parts=[image_part()] * 15), "Too many input images: 15"),
    ("pdf part", MODEL, _with(parts=[PDF]), "Unsupported MIME type: application/pdf"),
    ("not an image", MODEL, _with(parts=[image_part(b"GIF89a? no")]), "Unable to process input image"),
    ("bad base64", MODEL, _with(parts=[{"inlineData": {"mimeType": "image/png", "data": "!!"}}]),
     "Base64 decoding failed"),
    ("no mime type", MODEL, _with(parts=[{"inlineData": {"data": "AAAA"}}]), "mime_type must be specified"),
    ("empty contents", MODEL, {"contents": []}, "contents is not specified"),
    ("no contents", MODEL, {}, "contents is not specified"),
    ("empty parts", MODEL, {"contents": [{"role": "user", "parts": []}]}, "contents.parts must not be empty"),
    ("empty text", MODEL, {"contents": [{"parts": [{"text": ""}]}]}, "required oneof field 'data'"),
    ("whitespace only", MODEL, {"contents": [{"parts": [{"text": "  "}]}]}, "neither a text prompt nor"),
    ("bad role", MODEL, {"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "valid role"),
    ("two candidates", MODEL, _with({"candidateCount": 2}), "Multiple candidates is not enabled"),
    ("unknown top field", MODEL, _with(imageConfig={"aspectRatio": "1:1"}), 'Unknown name "imageConfig"'),
    ("unknown nested field", MODEL, _with({"imageConfig": {"ratio": "1:1"}}),
     "Unknown name \"ratio\" at 'generation_config.image_config'"),
    ("bad modality", MODEL, _with({"responseModalities": ["PICTURE"]}), "response_modalities[0]"),
    ("audio", MODEL, _with({"responseModalities": ["AUDIO"]}), "requested response modalities: audio"),
]  # fmt: skip


@pytest.mark.parametrize(("model", "body", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
async def test_invalid_requests_are_400_invalid_argument(gemini_url: str, model: str, body: Any, message: str) -> None:
    status, payload = await call(gemini_url, body, model=model)
    assert status == 400, payload
    assert payload["error"]["status"] == "INVALID_ARGUMENT" and payload["error"]["code"] == 400
    assert message in payload["error"]["message"], payload
    assert (await stats(gemini_url))["by_error"] == {"invalid_argument": 1}


async def test_all_documented_input_types_and_ratios_are_accepted(gemini_url: str) -> None:
    webp = io.BytesIO()
    Image.new("RGB", (8, 8)).save(webp, format="WEBP")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"
    parts = [image_part(webp.getvalue(), "image/webp"), image_part(jpeg.getvalue(), "image/jpeg"),
             image_part(heic, "image/heic")]  # fmt: skip
    assert (await call(gemini_url, _with(parts=parts)))[0] == 200
    for ratio in catalog.ASPECT_RATIOS:
        status, payload = await call(gemini_url, _with({"imageConfig": {"aspectRatio": ratio}}))
        assert status == 200, (ratio, payload)


async def test_file_data_naming_a_file_never_uploaded_is_403(gemini_url: str) -> None:
    part = {
        "fileData": {"mimeType": "image/png", "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/x"}
    }
    status, payload = await call(gemini_url, _with(parts=[part]))
    assert (status, payload["error"]["status"]) == (403, "PERMISSION_DENIED")


# --- request size ----------------------------------------------------------------------------------------


def raw_post(port: int, headers: dict[str, str], body: bytes = b"") -> tuple[bytes, bytes]:
    """One HTTP/1.1 exchange on a bare socket, where the client declares a length it never sends; returns
    the answer's head and body as soon as they are in (the server may hold the socket open after)."""
    head = f"POST /v1beta/models/{MODEL}:generateContent HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the answer's head: {received!r}"
            received += chunk
        answer_head, _, answer_body = received.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", answer_head)
        assert length is not None, answer_head
        while len(answer_body) < int(length.group(1)):
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the whole answer"
            answer_body += chunk
    return answer_head, answer_body


async def test_declared_length_over_100_mb_is_a_json_400_before_reading(gemini_url: str) -> None:
    port = int(gemini_url.rsplit(":", 1)[1])
    headers = {"x-goog-api-key": KEY, "Content-Type": "application/json",
               "Content-Length": str(catalog.MAX_REQUEST_BYTES + 1)}  # fmt: skip
    head, body = await asyncio.to_thread(raw_post, port, headers, b'{"contents": [')
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"application/json" in head
    assert json.loads(body) == {"error": {
        "code": 400, "status": "INVALID_ARGUMENT",
        "message": f"Request payload size exceeds the limit: {catalog.MAX_REQUEST_BYTES} bytes.",
    }}  # fmt: skip


async def test_streamed_body_over_the_limit_is_a_json_400_and_at_the_limit_is_read() -> None:
    limit = 64 * 1024
    at_limit = json.dumps(request_body("a big one")).encode()
    at_limit = at_limit[:-1] + b" " * (limit - len(at_limit)) + b"}"
    assert len(at_limit) == limit

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]

    async with serve(emulator.create_app(max_request_bytes=limit)) as url, aiohttp.ClientSession() as http:
        target = f"{url}/v1beta/models/{MODEL}:generateContent"
        headers = {"x-goog-api-key": KEY, "Content-Type": "application/json"}
        async with http.post(target, data=chunked(at_limit + b" "), headers=headers) as resp:
            assert resp.status == 400 and resp.content_type == "application/json"
            assert (await resp.json())["error"]["message"] == f"Request payload size exceeds the limit: {limit} bytes."
        async with http.post(target, data=chunked(at_limit), headers=headers) as resp:
            assert resp.status == 200, await resp.text()


# --- faults ----------------------------------------------------------------------------------------------


def quota_body(window: str, value: str, model: str = MODEL) -> dict[str, Any]:
    quota_id = f"GenerateRequestsPer{window}PerProjectPerModel"
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{
            "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
            "quotaId": quota_id,
            "quotaDimensions": {"location": "global", "model": model},
            "quotaValue": value,
        }],
    }  # fmt: skip


async def test_per_minute_429_carries_quota_failure_help_and_retry_info(gemini_url: str) -> None:
    prompt = f"minute {uuid.uuid4().hex} [emu:quota-minutex2]"
    for _ in range(2):
        status, payload = await call(gemini_url, request_body(prompt))
        assert status == 429
        error = payload["error"]
        assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED")
        assert error["message"].startswith("You exceeded your current quota")
        assert error["details"] == [
            quota_body("Minute", "500"),
            {
                "@type": "type.googleapis.com/google.rpc.Help",
                "links": [{"description": "Learn more about Gemini API quotas",
                           "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.2s"},
        ]  # fmt: skip
    assert (await call(gemini_url, request_body(prompt)))[0] == 200
    status, payload = await call(gemini_url, request_body(f"{prompt} [emu:429x1]"))
    assert status == 429 and payload["error"]["details"][0] == quota_body("Minute", "500")
    assert (await stats(gemini_url))["by_error"] == {"quota_minute": 3}


async def test_per_day_429_on_every_call_with_the_directive(gemini_url: str) -> None:
    for model in (MODEL, MODEL, PRO):
        status, payload = await call(gemini_url, request_body("[emu:quota-day] x"), model=model)
        assert status == 429
        details = payload["error"]["details"]
        assert details[0] == quota_body("Day", "2000", model)
        assert details[2] == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.2s"}
    assert (await stats(gemini_url))["by_error"] == {"quota_day": 3}


async def test_daily_quota_images_counts_images_until_a_quota_reset(gemini_url: str) -> None:
    assert (await admin(gemini_url, "POST", "config", {"daily_quota_images": 3}))[0] == 200
    assert (await call(gemini_url, request_body("[emu:safety] no image, not counted")))[0] == 200
    # Concurrent calls cannot overshoot: each image is counted when its call is admitted.
    results = await asyncio.gather(*(call(gemini_url, request_body(f"img {i}")) for i in range(6)))
    assert sorted(status for status, _ in results) == [200] * 3 + [429] * 3
    refused = next(payload for status, payload in results if status == 429)
    assert refused["error"]["details"][0] == quota_body("Day", "3")
    assert (await stats(gemini_url))["quota_images"] == 3

    assert (await admin(gemini_url, "POST", "quota/reset"))[0] == 200
    assert (await call(gemini_url, request_body("after the reset")))[0] == 200
    after = await stats(gemini_url)
    assert after["quota_images"] == 1 and after["images"] == 4
    assert after["config"]["daily_quota_images"] == 3  # a quota reset keeps the configuration


async def test_server_errors_and_billing(gemini_url: str) -> None:
    expected = {
        "[emu:500x1]": (500, "INTERNAL", "An internal error has occurred."),
        "[emu:503x1]": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
        "[emu:504x1]": (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
        "[emu:billing]": (400, "FAILED_PRECONDITION", "User location is not supported for the API use"),
    }
    for directive, (code, status_name, message) in expected.items():
        prompt = f"{directive} {uuid.uuid4().hex}"
        status, payload = await call(gemini_url, request_body(prompt))
        assert (status, payload["error"]["code"], payload["error"]["status"]) == (code, code, status_name)
        assert payload["error"]["message"].startswith(message)
        again = (await call(gemini_url, request_body(prompt)))[0]
        assert again == (400 if directive == "[emu:billing]" else 200)
    assert (await stats(gemini_url))["by_error"] == {
        "internal": 1, "unavailable": 1, "deadline_exceeded": 1, "billing": 2,
    }  # fmt: skip


async def test_finish_reasons_without_an_image(gemini_url: str) -> None:
    for directive, reason in [("safety", "IMAGE_SAFETY"), ("recitation", "IMAGE_RECITATION"),
                              ("max-tokens", "MAX_TOKENS"), ("no-image", "NO_IMAGE"),
                              ("image-other", "IMAGE_OTHER")]:  # fmt: skip
        status, payload = await call(gemini_url, request_body(f"[emu:{directive}] x"))
        assert status == 200
        assert payload["candidates"] == [{"finishReason": reason, "index": 0}]
        assert "candidatesTokenCount" not in payload["usageMetadata"]
    status, payload = await call(gemini_url, request_body("[emu:blocked] x"))
    assert "candidates" not in payload and payload["promptFeedback"] == {"blockReason": "PROHIBITED_CONTENT"}
    status, payload = await call(gemini_url, request_body("[emu:text-only] x"))
    assert [set(p) for p in payload["candidates"][0]["content"]["parts"]] == [{"text"}]
    assert (await stats(gemini_url))["by_finish_reason"] == {
        "IMAGE_SAFETY": 1, "IMAGE_RECITATION": 1, "MAX_TOKENS": 1, "NO_IMAGE": 1, "IMAGE_OTHER": 1,
        "PROMPT_BLOCKED": 1, "STOP": 1,
    }  # fmt: skip


async def test_counted_no_image_directives_then_an_image(gemini_url: str) -> None:
    for directive, reason in [("no-imagex2", "NO_IMAGE"), ("image-otherx1", "IMAGE_OTHER")]:
        prompt = f"[emu:{directive}] {uuid.uuid4().hex}"
        count = int(directive[-1])
        for _ in range(count):
            assert (await call(gemini_url, request_body(prompt)))[1]["candidates"][0]["finishReason"] == reason
        status, payload = await call(gemini_url, request_body(prompt))
        assert status == 200 and inline_images(payload), payload


async def test_thought_only_answer(gemini_url: str) -> None:
    body = request_body("[emu:thought-only] x", responseModalities=["IMAGE"])
    status, payload = await call(gemini_url, body, model=PRO)
    assert status == 200
    [candidate] = payload["candidates"]
    assert candidate["finishReason"] == "STOP"
    [part] = candidate["content"]["parts"]
    assert part["thought"] is True and "inlineData" in part
    assert (await stats(gemini_url))["images"] == 0


# --- admin and modes -------------------------------------------------------------------------------------


async def test_admin_config_injects_random_errors_and_reset_restores(gemini_url: str) -> None:
    body = request_body("x")
    status, config = await admin(gemini_url, "POST", "config", {"error_rate": 1.0})
    assert status == 200 and config == {**DEFAULT_CONFIG, "error_rate": 1.0}
    assert (await call(gemini_url, body))[0] == 503
    for bad in ({"error_rate": 2}, {"daily_quota_images": -1}, {"daily_quota_images": 1.5},
                {"latency_jitter_ms": "10"}, {"image_mode": "huge"}, {"nope": 1}, {"latency_ms": True}):  # fmt: skip
        assert (await admin(gemini_url, "POST", "config", bad))[0] == 400, bad
    await admin(gemini_url, "POST", "reset")
    assert (await call(gemini_url, body))[0] == 200
    assert await stats(gemini_url) == {
        "calls": 1, "by_status": {"200": 1}, "by_error": {}, "by_finish_reason": {"STOP": 1}, "images": 1,
        "quota_images": 1, "config": DEFAULT_CONFIG,
        "batches_created": 0, "batch_requests": 0, "batch_request_errors": {}, "batch_api_by_status": {},
        "batch_api_by_error": {}, "files_uploaded": 0, "file_downloads": 0, "batches_by_state": {},
    }  # fmt: skip


def test_latency_jitter_is_lognormal_around_its_scale() -> None:
    rng = random.Random(7)
    draws = sorted(jitter_ms(100, rng) for _ in range(4000))
    assert 90 <= draws[len(draws) // 2] <= 110  # median = scale
    assert 200 <= draws[int(0.95 * len(draws))] <= 260  # exp(1.645 * 0.5) = 2.28
    assert 0 < draws[0] and draws[-1] <= JITTER_CAP * 100
    assert jitter_ms(0, rng) == 0


async def test_latency_jitter_delays_calls(gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"latency_ms": 100, "latency_jitter_ms": 50})
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(gemini_url, request_body("slow")))[0] == 200
    assert loop.time() - started >= 0.1


async def test_realistic_images_have_the_models_resolution_and_weight(gemini_url: str) -> None:
    await admin(gemini_url, "POST", "config", {"image_mode": "realistic"})
    body = request_body("a wide view", responseModalities=["IMAGE"], imageConfig={"aspectRatio": "16:9"})
    datas = []
    for _ in range(2):
        status, payload = await call(gemini_url, body)
        assert status == 200
        [part] = inline_images(payload)
        assert decoded_size(part) == (1344, 768)
        datas.append(base64.b64decode(part["inlineData"]["data"]))
    assert all(1_000_000 <= len(data) <= 2_500_000 for data in datas), [len(d) for d in datas]
    assert datas[0] != datas[1]

    four_k = request_body("huge", responseModalities=["IMAGE"], imageConfig={"aspectRatio": "21:9", "imageSize": "4K"})
    status, payload = await call(gemini_url, four_k, model=PRO)
    assert status == 200
    assert [decoded_size(p) for p in inline_images(payload)] == [(6336, 2688)] * 2


def test_resolution_tables_follow_the_ratios() -> None:
    def close(size: tuple[int, int], ratio: str) -> bool:
        w, h = (int(n) for n in ratio.split(":"))
        return abs(size[0] / size[1] / (w / h) - 1) < 0.03  # the docs' sizes are multiples of 16

    for spec in (catalog.FLASH_IMAGE, catalog.PRO_IMAGE):
        for image_size, table in spec.resolutions.items():
            assert all(close(size, ratio) for ratio, size in table.items()), (spec.name, image_size)
    assert catalog.PRO_IMAGE.resolution("16:9", "4K") == (5504, 3072)
    assert catalog.FLASH_IMAGE.resolution(None, None) == (1024, 1024)
