"""The Gemini emulator, driven by the real google-genai client (as the worker uses it) and by raw HTTP."""

import base64
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types
from PIL import Image

from deploy.emulators import gemini as emulator

MODEL = "gemini-2.5-flash-image"


@pytest.fixture(scope="module")
def gemini_url(workdir: Path) -> Iterator[str]:
    proc, url = emulator.start(workdir)
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
async def fresh_emulator(gemini_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        await http.post(gemini_url + "/_emulator/reset")


@pytest.fixture(scope="module")
async def client(gemini_url: str) -> AsyncIterator[genai.Client]:
    client = genai.Client(api_key="x", http_options=types.HttpOptions(base_url=gemini_url, api_version="v1beta"))
    yield client
    await client.aio.aclose()


def png_bytes(size: tuple[int, int] = (32, 32), color: str = "red") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def last_image(response: types.GenerateContentResponse) -> types.Blob | None:
    images = [p.inline_data for p in response.parts or [] if p.inline_data is not None]
    return images[-1] if images else None


async def stats(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url + "/_emulator/stats") as resp:
        return await resp.json()


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
    v1 = genai.Client(api_key="x", http_options=types.HttpOptions(base_url=gemini_url, api_version="v1"))
    try:
        response = await v1.aio.models.generate_content(model=MODEL, contents="a boat")
    finally:
        await v1.aio.aclose()
    blob = last_image(response)
    assert blob is not None and blob.data is not None
    assert Image.open(io.BytesIO(blob.data)).format == "PNG"


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
    url = f"{gemini_url}/v1beta/models/{MODEL}:generateContent"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, headers={"x-goog-api-key": "x"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        payload = await resp.json()
    assert payload["usageMetadata"]["promptTokenCount"] == len("snake case") // 4 + 258
    data = base64.b64decode(payload["candidates"][0]["content"]["parts"][0]["inlineData"]["data"])
    assert Image.open(io.BytesIO(data)).size == (144, 256)


async def test_429_directive_then_success(client: genai.Client, gemini_url: str) -> None:
    prompt = f"busy {uuid.uuid4().hex} [emu:429x1]"
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents=prompt)
    assert caught.value.code == 429
    assert caught.value.status == "RESOURCE_EXHAUSTED"
    assert caught.value.details["error"]["details"][0]["retryDelay"] == "0.2s"
    response = await client.aio.models.generate_content(model=MODEL, contents=prompt)
    assert last_image(response) is not None
    assert (await stats(gemini_url))["by_status"] == {"429": 1, "200": 1}


async def test_5xx_directive_raises_server_error(client: genai.Client) -> None:
    with pytest.raises(errors.ServerError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="[emu:503x1] down")
    assert caught.value.code == 503 and caught.value.status == "UNAVAILABLE"


async def test_safety_directive(client: genai.Client) -> None:
    response = await client.aio.models.generate_content(model=MODEL, contents="[emu:safety] nope")
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.IMAGE_SAFETY
    assert response.parts is None


async def test_blocked_and_text_only_directives(client: genai.Client) -> None:
    blocked = await client.aio.models.generate_content(model=MODEL, contents="[emu:blocked] x")
    assert not blocked.candidates
    assert blocked.prompt_feedback and blocked.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    text_only = await client.aio.models.generate_content(model=MODEL, contents="[emu:text-only] x")
    assert last_image(text_only) is None and text_only.text


async def test_missing_api_key_is_401(gemini_url: str) -> None:
    url = f"{gemini_url}/v1beta/models/{MODEL}:generateContent"
    async with aiohttp.ClientSession() as http, http.post(url, json={"contents": []}) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"


async def test_admin_config_injects_random_errors_and_reset_restores(gemini_url: str) -> None:
    url = f"{gemini_url}/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gemini_url + "/_emulator/config", json={"error_rate": 1.0}) as resp:
            assert resp.status == 200
            assert (await resp.json())["error_rate"] == 1.0
        async with http.post(url, json=body, headers={"x-goog-api-key": "x"}) as resp:
            assert resp.status == 503
        async with http.post(gemini_url + "/_emulator/config", json={"error_rate": 2}) as resp:
            assert resp.status == 400
        await http.post(gemini_url + "/_emulator/reset")
        async with http.post(url, json=body, headers={"x-goog-api-key": "x"}) as resp:
            assert resp.status == 200
    assert await stats(gemini_url) == {
        "calls": 1, "by_status": {"200": 1}, "images": 1,
        "config": {"latency_ms": 0, "error_rate": 0.0, "rate_limit_rate": 0.0, "timeout_rate": 0.0},
    }  # fmt: skip
