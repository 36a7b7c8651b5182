"""The Gemini emulator as the real google-genai client sees it: every error class and every answer
without an image, read through the SDK's own objects (errors.ClientError / ServerError with .code
.status .details, GenerateContentResponse with .parts .candidates .usage_metadata).

Each test names, in its docstring, the documented behaviour it holds the emulator to; docs/emulators.md
lists the sources. The SDK's retries are off (HttpRetryOptions(attempts=1)) so each call is one request.
"""

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

FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
KEY = "contract-key"


@pytest.fixture(scope="module")
def gemini_url(workdir: Path) -> Iterator[str]:
    proc, url = emulator.start(workdir, api_keys=[KEY])
    yield url
    proc.stop()


@pytest.fixture(autouse=True)
async def fresh_emulator(gemini_url: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(gemini_url + "/_emulator/reset") as resp:
        assert resp.status == 200


def make_client(url: str, api_key: str = KEY, headers: dict[str, str] | None = None) -> genai.Client:
    options = types.HttpOptions(
        base_url=url, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1), headers=headers
    )
    return genai.Client(api_key=api_key, http_options=options)


@pytest.fixture(scope="module")
async def client(gemini_url: str) -> AsyncIterator[genai.Client]:
    client = make_client(gemini_url)
    yield client
    await client.aio.aclose()


def with_images(text: str, *images: types.Part) -> list[Any]:
    return [text, *images]


def png(color: str = "red") -> types.Part:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(out, format="PNG")
    return types.Part.from_bytes(data=out.getvalue(), mime_type="image/png")


def image_config(**image: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(response_modalities=["IMAGE"], image_config=types.ImageConfig(**image))


async def client_error(client: genai.Client, model: str = FLASH, contents: Any = "a fox", **config: Any) -> Any:
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(
            model=model, contents=contents, config=types.GenerateContentConfig(**config) if config else None
        )
    return caught.value


def detail(error: errors.APIError, type_suffix: str) -> dict[str, Any]:
    [found] = [d for d in error.details["error"]["details"] if d["@type"].endswith(type_suffix)]
    return dict(found)


def only_final_images(response: types.GenerateContentResponse) -> list[bytes]:
    return [p.inline_data.data for p in response.parts or [] if p.inline_data and p.inline_data.data and not p.thought]


# --- keys ------------------------------------------------------------------------------------------------


async def test_no_key_is_permission_denied(gemini_url: str) -> None:
    """API keys page: a call without a key is refused 403 PERMISSION_DENIED ("Method doesn't allow
    unregistered callers"). The SDK will not build a client without a key, so the header is blanked."""
    anonymous = make_client(gemini_url, api_key="unused", headers={"x-goog-api-key": ""})
    try:
        error = await client_error(anonymous)
    finally:
        await anonymous.aio.aclose()
    assert (error.code, error.status) == (403, "PERMISSION_DENIED")
    assert error.message.startswith("Method doesn't allow unregistered callers")


async def test_invalid_key_is_api_key_invalid(gemini_url: str) -> None:
    """Troubleshooting page: an invalid key is 400 INVALID_ARGUMENT "API key not valid", with an
    ErrorInfo whose reason is API_KEY_INVALID (the field a client should branch on)."""
    stranger = make_client(gemini_url, api_key="leaked-and-revoked")
    try:
        error = await client_error(stranger)
    finally:
        await stranger.aio.aclose()
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert error.message == "API key not valid. Please pass a valid API key."
    info = detail(error, "ErrorInfo")
    assert info["reason"] == "API_KEY_INVALID"
    assert info["metadata"] == {"service": "generativelanguage.googleapis.com"}


# --- models and request validation -----------------------------------------------------------------------


async def test_unknown_model_is_not_found(client: genai.Client) -> None:
    """Troubleshooting page: a model that does not exist is 404 NOT_FOUND "models/X is not found for API
    version v1beta, or is not supported for generateContent"."""
    error = await client_error(client, model="gemini-2.5-flash-imagine")
    assert (error.code, error.status) == (404, "NOT_FOUND")
    assert error.message.startswith("models/gemini-2.5-flash-imagine is not found for API version v1beta")


async def test_text_model_refuses_image_output(client: genai.Client) -> None:
    """Models page: gemini-2.5-flash outputs text only; asking it for IMAGE is 400 INVALID_ARGUMENT
    "Model does not support the requested response modalities: image"."""
    error = await client_error(client, model="gemini-2.5-flash", response_modalities=["TEXT", "IMAGE"])
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert error.message == "Model does not support the requested response modalities: image"


async def test_unsupported_aspect_ratio(client: genai.Client) -> None:
    """Image-generation page: aspectRatio is one of 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9."""
    error = await client_error(
        client, response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="2:1")
    )
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert "aspect ratio" in error.message
    assert detail(error, "BadRequest")["fieldViolations"][0]["field"] == "generation_config.image_config.aspect_ratio"


async def test_image_size_is_for_gemini_3_pro_only(client: genai.Client) -> None:
    """Image-generation page: gemini-2.5-flash-image draws one resolution per ratio (no imageSize);
    gemini-3-pro-image-preview takes 1K, 2K or 4K with an uppercase K, 4K costing 2,000 tokens."""
    error = await client_error(client, response_modalities=["IMAGE"], image_config=types.ImageConfig(image_size="1K"))
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    lower = await client_error(
        client, model=PRO, response_modalities=["IMAGE"], image_config=types.ImageConfig(image_size="4k")
    )
    assert lower.code == 400
    response = await client.aio.models.generate_content(
        model=PRO, contents="a map", config=image_config(image_size="4K")
    )
    assert response.usage_metadata and response.usage_metadata.candidates_token_count == 2000


async def test_reference_image_limits(client: genai.Client) -> None:
    """Image-generation page: 2.5 Flash Image "works best with up to 3" input images, 3 Pro takes up to
    14. The emulator makes both hard limits (stricter than the docs for 2.5 Flash Image)."""
    assert (await client.aio.models.generate_content(model=FLASH, contents=with_images("mix", *[png()] * 3))).parts
    error = await client_error(client, contents=with_images("mix", *[png()] * 4))
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
    assert "Too many input images: 4" in error.message
    assert (await client.aio.models.generate_content(model=PRO, contents=with_images("mix", *[png()] * 14))).parts
    assert (await client_error(client, model=PRO, contents=with_images("mix", *[png()] * 15))).code == 400


async def test_pdf_part_is_refused(client: genai.Client) -> None:
    """Image-generation and image-understanding pages: image inputs are PNG, JPEG, WEBP, HEIC or HEIF;
    a PDF part is refused with 400 INVALID_ARGUMENT."""
    pdf = types.Part.from_bytes(data=b"%PDF-1.7\n%%EOF", mime_type="application/pdf")
    error = await client_error(client, contents=with_images("summarise as a poster", pdf))
    assert (error.code, error.status, error.message) == (
        400,
        "INVALID_ARGUMENT",
        "Unsupported MIME type: application/pdf",
    )


async def test_one_candidate_per_call(client: genai.Client) -> None:
    """Image models answer one candidate: candidate_count > 1 is 400 INVALID_ARGUMENT (4 images = 4 calls)."""
    error = await client_error(client, candidate_count=2)
    assert (error.code, error.status) == (400, "INVALID_ARGUMENT")


async def test_billing_is_failed_precondition(client: genai.Client) -> None:
    """Troubleshooting page: 400 FAILED_PRECONDITION when the free tier is not available in the caller's
    location and billing is not enabled."""
    error = await client_error(client, contents="[emu:billing] a fox")
    assert (error.code, error.status) == (400, "FAILED_PRECONDITION")
    assert "billing" in error.message


# --- quotas and server errors ----------------------------------------------------------------------------


async def test_per_minute_quota(client: genai.Client) -> None:
    """Rate-limits page: over a per-minute limit the API answers 429 RESOURCE_EXHAUSTED with a QuotaFailure
    naming the quota (quotaId ...PerMinute...), a Help link and a RetryInfo delay."""
    prompt = f"[emu:quota-minutex1] {uuid.uuid4().hex}"
    error = await client_error(client, contents=prompt)
    assert (error.code, error.status) == (429, "RESOURCE_EXHAUSTED")
    violation = detail(error, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerMinutePerProjectPerModel"
    assert violation["quotaDimensions"] == {"location": "global", "model": FLASH}
    assert detail(error, "RetryInfo")["retryDelay"] == "0.2s"
    assert detail(error, "Help")["links"]
    assert only_final_images(await client.aio.models.generate_content(model=FLASH, contents=prompt))


async def test_per_day_quota(client: genai.Client, gemini_url: str) -> None:
    """Rate-limits page: a daily limit gives the same 429 with quotaId ...PerDay... (it resets at midnight
    Pacific time, not after RetryInfo's delay, which is still sent)."""
    error = await client_error(client, contents="[emu:quota-day] a fox")
    assert detail(error, "QuotaFailure")["violations"][0]["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel"
    assert "retryDelay" in detail(error, "RetryInfo")

    async with aiohttp.ClientSession() as http:
        await http.post(gemini_url + "/_emulator/config", json={"daily_quota_images": 1})
    assert only_final_images(await client.aio.models.generate_content(model=FLASH, contents="the last one"))
    error = await client_error(client, contents="one too many")
    assert error.code == 429
    violation = detail(error, "QuotaFailure")["violations"][0]
    assert (violation["quotaId"], violation["quotaValue"]) == ("GenerateRequestsPerDayPerProjectPerModel", "1")


@pytest.mark.parametrize(
    ("directive", "code", "status"),
    [("500", 500, "INTERNAL"), ("503", 503, "UNAVAILABLE"), ("504", 504, "DEADLINE_EXCEEDED")],
)
async def test_server_errors(client: genai.Client, directive: str, code: int, status: str) -> None:
    """Troubleshooting page: 500 INTERNAL, 503 UNAVAILABLE (overloaded) and 504 DEADLINE_EXCEEDED are
    transient; the SDK raises them as errors.ServerError."""
    prompt = f"[emu:{directive}x1] {uuid.uuid4().hex}"
    with pytest.raises(errors.ServerError) as caught:
        await client.aio.models.generate_content(model=FLASH, contents=prompt)
    assert (caught.value.code, caught.value.status) == (code, status)
    assert only_final_images(await client.aio.models.generate_content(model=FLASH, contents=prompt))


# --- answers without an image ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "reason"),
    [
        ("safety", types.FinishReason.IMAGE_SAFETY),
        ("recitation", types.FinishReason.IMAGE_RECITATION),
        ("max-tokens", types.FinishReason.MAX_TOKENS),
        ("no-image", types.FinishReason.NO_IMAGE),
        ("image-other", types.FinishReason.IMAGE_OTHER),
    ],
)
async def test_finish_reasons_without_an_image(
    client: genai.Client, directive: str, reason: types.FinishReason
) -> None:
    """GenerateContentResponse reference (FinishReason): a 200 whose candidate ends with IMAGE_SAFETY,
    IMAGE_RECITATION, MAX_TOKENS, NO_IMAGE or IMAGE_OTHER carries no content; the SDK's .parts is None."""
    response = await client.aio.models.generate_content(model=FLASH, contents=f"[emu:{directive}] a fox")
    assert response.candidates and response.candidates[0].finish_reason == reason
    assert response.parts is None


async def test_blocked_prompt_and_text_only_answer(client: genai.Client) -> None:
    """GenerateContentResponse reference: a blocked prompt has no candidates and a promptFeedback
    blockReason; a text-only answer (STOP) has text and no inline data."""
    blocked = await client.aio.models.generate_content(model=FLASH, contents="[emu:blocked] a fox")
    assert not blocked.candidates
    assert blocked.prompt_feedback and blocked.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    chatty = await client.aio.models.generate_content(model=FLASH, contents="[emu:text-only] a fox")
    assert chatty.text and not only_final_images(chatty)
    assert chatty.candidates and chatty.candidates[0].finish_reason == types.FinishReason.STOP


async def test_no_image_is_transient_when_counted(client: genai.Client) -> None:
    """NO_IMAGE and IMAGE_OTHER are often transient: with xN only the first N calls miss the image."""
    prompt = f"[emu:no-imagex1] {uuid.uuid4().hex}"
    assert (await client.aio.models.generate_content(model=FLASH, contents=prompt)).parts is None
    assert only_final_images(await client.aio.models.generate_content(model=FLASH, contents=prompt))


# --- thought images and metadata -------------------------------------------------------------------------


async def test_gemini_3_thought_image_comes_before_the_final_one(client: genai.Client) -> None:
    """Image-generation page ("Thinking process"): gemini-3-pro-image-preview sends interim images marked
    thought: true before the final image, which carries a thought signature; the last image is the answer."""
    response = await client.aio.models.generate_content(
        model=PRO, contents="a lighthouse", config=types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"])
    )
    parts = response.parts or []
    images = [p for p in parts if p.inline_data is not None]
    assert [bool(p.thought) for p in images] == [True, False]
    assert images[-1].thought_signature and not images[0].thought_signature
    assert response.text  # the caption; .text leaves thought parts out
    usage = response.usage_metadata
    assert usage and usage.thoughts_token_count and usage.candidates_token_count
    assert (
        usage.total_token_count
        == (usage.prompt_token_count or 0) + usage.candidates_token_count + usage.thoughts_token_count
    )


async def test_thought_only_answer_has_no_final_image(client: genai.Client) -> None:
    """Image-generation page: thought images are interim drafts; an answer with only a thought image
    (finishReason STOP) has no result, and a client taking "the last inline image" would take a draft."""
    response = await client.aio.models.generate_content(model=PRO, contents="[emu:thought-only] a lighthouse")
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    assert [bool(p.thought) for p in response.parts or []] == [True]
    assert not only_final_images(response)


async def test_response_id_model_version_and_token_details(client: genai.Client) -> None:
    """GenerateContentResponse and UsageMetadata reference: responseId, modelVersion, and prompt and
    candidate token counts by modality; 1,290 tokens per 2.5 Flash Image output, 258 per input image."""
    first, second = [
        await client.aio.models.generate_content(
            model=FLASH,
            contents=with_images("a red fox", png()),
            config=types.GenerateContentConfig(response_modalities=["IMAGE"]),
        )
        for _ in range(2)
    ]
    assert first.response_id and second.response_id and first.response_id != second.response_id
    assert first.model_version == FLASH
    usage = first.usage_metadata
    assert usage is not None
    prompt = {d.modality: d.token_count for d in usage.prompt_tokens_details or []}
    output = {d.modality: d.token_count for d in usage.candidates_tokens_details or []}
    assert prompt == {types.MediaModality.TEXT: 2, types.MediaModality.IMAGE: 258}
    assert output == {types.MediaModality.IMAGE: 1290}
    assert usage.total_token_count == 2 + 258 + 1290
