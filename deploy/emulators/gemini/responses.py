"""The 200 bodies: GenerateContentResponse as the REST reference describes it
(https://ai.google.dev/api/generate-content#generatecontentresponse) and google-genai parses it
(google/genai/types.py: GenerateContentResponse, Candidate, Part, UsageMetadata, ModalityTokenCount).

Zero and empty fields are left out, as proto3 JSON does: the client then reads None, as it would from
Google. Every body has a random `responseId` and the requested model as `modelVersion`.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from typing import Any

from deploy.emulators.gemini import catalog
from deploy.emulators.gemini.request import ParsedRequest

TEXT_ONLY_ANSWER = "I can't create that image, but here is a description of it instead."
TEXT_MODEL_ANSWER = "This is the emulator's answer from a text-only model."
IMAGE_CAPTION = "Here is the picture you asked for."
THOUGHT_SUMMARY = "**Composing the picture**\n\nI am laying out the scene before rendering it."


def envelope(model: str) -> dict[str, Any]:
    # Real ids are ~23 URL-safe characters, unique per call.
    return {"responseId": secrets.token_urlsafe(17), "modelVersion": model}


def text_tokens(text: str) -> int:
    return len(text) // 4


def _details(by_modality: dict[str, int]) -> list[dict[str, Any]]:
    return [
        {"modality": modality, "tokenCount": count} if count else {"modality": modality}
        for modality, count in by_modality.items()
    ]


def usage(
    request: ParsedRequest, *, text_out: str = "", image_tokens: int = 0, thought_tokens: int = 0
) -> dict[str, Any]:
    """Prompt tokens: 1 per 4 characters of text plus 258 per input image (image-understanding page);
    output: the text's tokens plus the model's tokens per image; thinking apart, as thoughtsTokenCount."""
    prompt = {"TEXT": text_tokens(request.text)}
    if request.images:
        prompt["IMAGE"] = catalog.TOKENS_PER_INPUT_IMAGE * len(request.images)
    output: dict[str, int] = {}
    if text_out:
        output["TEXT"] = text_tokens(text_out)
    if image_tokens:
        output["IMAGE"] = image_tokens
    prompt_total, output_total = sum(prompt.values()), sum(output.values())
    result: dict[str, Any] = {
        "promptTokenCount": prompt_total,
        "candidatesTokenCount": output_total,
        "totalTokenCount": prompt_total + output_total + thought_tokens,
        "thoughtsTokenCount": thought_tokens,
        "promptTokensDetails": _details(prompt),
        "candidatesTokensDetails": _details(output),
    }
    return {key: value for key, value in result.items() if value}


def candidate(parts: list[dict[str, Any]] | None, finish_reason: str) -> dict[str, Any]:
    result: dict[str, Any] = {"finishReason": finish_reason, "index": 0}
    if parts:
        result["content"] = {"role": "model", "parts": parts}
    return result


def image_part(data_b64: str, *, thought: bool = False, signed: bool = False) -> dict[str, Any]:
    part: dict[str, Any] = {"inlineData": {"mimeType": "image/png", "data": data_b64}}
    if thought:
        part["thought"] = True
    if signed:
        # Gemini 3 signs its final parts; multi-turn callers must send the signature back.
        part["thoughtSignature"] = base64.b64encode(secrets.token_bytes(36)).decode()
    return part


def timestamp(seconds: float) -> str:
    """RFC 3339, Z-normalized, 6 fractional digits: the REST reference's Timestamp format (0, 3, 6 or 9)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
