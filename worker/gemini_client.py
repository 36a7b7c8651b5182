"""Gemini image generation for the worker: settings, one shared client, retries and outcome mapping.

Deployed alone with handler.py (no `shared` package in the image), so it depends only on the SDK.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpx
from google import genai
from google.genai import errors, types

log = logging.getLogger("bunch.worker.gemini")

FailureReason = Literal["safety_blocked", "no_image", "upstream_error"]

# Finish reasons that mean "the model refused on policy grounds" rather than "it produced no image".
SAFETY_FINISH_REASONS = frozenset(
    {"IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"}
)
# 408/429 are the only 4xx worth repeating; every other 4xx would fail identically again.
RETRYABLE_CLIENT_CODES = frozenset({408, 429})
# The SDK's aiohttp transport raises asyncio/aiohttp errors; its httpx transport raises httpx ones.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TimeoutError,
    aiohttp.ClientError,
    httpx.TransportError,
)
DETAIL_MAX_CHARS = 300


@dataclass(frozen=True)
class WorkerSettings:
    """Every environment knob of the worker, read in one place."""

    api_key: str
    base_url: str | None
    timeout_seconds: float
    max_attempts: int
    backoff_max_seconds: float
    backoff_base_seconds: float
    concurrency: int
    max_parallel_calls: int
    transfer_max_attempts: int
    transfer_backoff_max_seconds: float

    @classmethod
    def from_env(cls) -> WorkerSettings:
        env = os.environ
        return cls(
            api_key=env.get("GEMINI_API_KEY", ""),
            base_url=env.get("GEMINI_BASE_URL") or None,
            timeout_seconds=float(env.get("GEMINI_TIMEOUT_SECONDS", "120")),
            max_attempts=max(1, int(env.get("GEMINI_MAX_ATTEMPTS", "6"))),
            backoff_max_seconds=float(env.get("GEMINI_BACKOFF_MAX_SECONDS", "30")),
            backoff_base_seconds=float(env.get("GEMINI_BACKOFF_BASE_SECONDS", "1")),
            concurrency=max(1, int(env.get("WORKER_CONCURRENCY", "4"))),
            max_parallel_calls=max(1, int(env.get("GEMINI_MAX_PARALLEL", "16"))),
            transfer_max_attempts=max(1, int(env.get("TRANSFER_MAX_ATTEMPTS", "5"))),
            transfer_backoff_max_seconds=float(env.get("TRANSFER_BACKOFF_MAX_SECONDS", "10")),
        )


def backoff_delay(attempt: int, base: float, cap: float, hint: float | None = None) -> float:
    """Delay before retry number `attempt` (1-based): the server's hint if any, else exponential.

    Jitter spreads the retries of the many concurrent calls of a worker so they don't hit Gemini in lockstep.
    """
    if hint is not None:
        return min(cap, hint + random.uniform(0, 0.1 * hint))
    return min(cap, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


# --- the client ------------------------------------------------------------------------------------------

_client: genai.Client | None = None
_client_key: tuple[str, str | None] | None = None


def get_client(settings: WorkerSettings) -> genai.Client:
    """The process-wide client, built on first use so env set after import (tests, RunPod) is honoured.

    Recreating a client per request closes connections under in-flight calls, hence the cache.
    """
    global _client, _client_key
    # The timeout is not part of the key: generate_image bounds each call itself with the current value.
    key = (settings.api_key, settings.base_url)
    if _client is None or _client_key != key:
        http_options = types.HttpOptions(
            timeout=int(settings.timeout_seconds * 1000),
            # attempts=1 turns off the SDK's hidden 1-10 s sleep-and-retry on connection errors:
            # retries (and their budget) are owned by generate_image below.
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        if settings.base_url:
            http_options.base_url = settings.base_url
            http_options.api_version = "v1beta"
        _client = genai.Client(api_key=settings.api_key or None, http_options=http_options)
        _client_key = key
    return _client


# --- one image -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    data: bytes
    mime_type: str


@dataclass
class ImageResult:
    ok: bool
    data: bytes | None = None
    mime_type: str | None = None
    error: FailureReason | None = None
    detail: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0


def build_config(aspect_ratio: str | None, image_size: str | None) -> types.GenerateContentConfig:
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        # No tools are passed; disabling AFC also drops the SDK's per-call "AFC is enabled" log line.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    if aspect_ratio is not None or image_size is not None:
        # Only the fields the run asked for: unset ones leave the model's own defaults in charge.
        config.image_config = types.ImageConfig()
        if aspect_ratio is not None:
            config.image_config.aspect_ratio = aspect_ratio
        if image_size is not None:
            config.image_config.image_size = image_size
    return config


def retry_delay_hint(error: errors.APIError) -> float | None:
    """Seconds from a google.rpc.RetryInfo in the error body ("37s", "0.5s"), if the server sent one."""
    body = error.details
    if not isinstance(body, dict):
        return None
    inner = body.get("error", body)
    details = inner.get("details") if isinstance(inner, dict) else None
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict) or not str(detail.get("@type", "")).endswith("RetryInfo"):
            continue
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", str(detail.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def interpret_response(response: types.GenerateContentResponse) -> ImageResult:
    """Map a 200 response to an image or to the reason there is none."""
    usage = response.usage_metadata
    tokens_in = (usage.prompt_token_count or 0) if usage else 0
    tokens_out = (usage.candidates_token_count or 0) if usage else 0

    def failed(error: FailureReason, detail: str) -> ImageResult:
        return ImageResult(
            ok=False, error=error, detail=_short(detail), prompt_tokens=tokens_in, output_tokens=tokens_out
        )

    # Gemini 3 may stream interim "thought" images before the final one: the last image is the answer.
    image = None
    for part in response.parts or []:
        if part.inline_data is not None and part.inline_data.data:
            image = part.inline_data
    if image is not None:
        mime_type = image.mime_type or "image/png"
        return ImageResult(
            ok=True, data=image.data, mime_type=mime_type, prompt_tokens=tokens_in, output_tokens=tokens_out
        )

    feedback = response.prompt_feedback
    block_reason = _enum_name(feedback.block_reason) if feedback else None
    if block_reason:
        return failed("safety_blocked", f"prompt blocked: {block_reason}")
    candidate = response.candidates[0] if response.candidates else None
    finish = _enum_name(candidate.finish_reason) if candidate else None
    if finish in SAFETY_FINISH_REASONS:
        message = candidate.finish_message if candidate else None
        return failed("safety_blocked", f"finish reason {finish}" + (f": {message}" if message else ""))
    text = "".join(p.text for p in response.parts or [] if p.text)
    return failed(
        "no_image", f"no image in response (finish reason {finish or 'none'})" + (f": {text}" if text else "")
    )


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, errors.ServerError):
        return True
    if isinstance(exc, errors.ClientError):
        return exc.code in RETRYABLE_CLIENT_CODES
    return isinstance(exc, TRANSIENT_EXCEPTIONS)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, errors.APIError):
        return _short(f"{exc.code} {exc.status or ''}: {exc.message or ''}")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return _short(f"{type(exc).__name__}: {exc}")


async def generate_image(
    settings: WorkerSettings,
    model: str,
    prompt: str,
    references: Sequence[Reference],
    aspect_ratio: str | None = None,
    image_size: str | None = None,
) -> ImageResult:
    """One Gemini call (one image), retried on 429/5xx/timeouts. Never raises for upstream problems."""
    client = get_client(settings)
    contents: list[Any] = [prompt]
    contents += [types.Part.from_bytes(data=ref.data, mime_type=ref.mime_type) for ref in references]
    config = build_config(aspect_ratio, image_size)
    for attempt in range(1, settings.max_attempts + 1):
        try:
            # The SDK's timeout is frozen when the shared client is built; this one follows the current setting.
            async with asyncio.timeout(settings.timeout_seconds):
                response = await client.aio.models.generate_content(model=model, contents=contents, config=config)
        except Exception as exc:
            if not _is_retryable(exc):
                log.warning("gemini call failed, not retryable: %s", _describe(exc))
                return ImageResult(ok=False, error="upstream_error", detail=_describe(exc))
            if attempt == settings.max_attempts:
                detail = f"gave up after {attempt} attempts: {_describe(exc)}"
                log.warning("gemini call failed: %s", detail)
                return ImageResult(ok=False, error="upstream_error", detail=_short(detail))
            hint = retry_delay_hint(exc) if isinstance(exc, errors.APIError) else None
            delay = backoff_delay(attempt, settings.backoff_base_seconds, settings.backoff_max_seconds, hint)
            log.info("gemini attempt %d failed (%s), retrying in %.2fs", attempt, _describe(exc), delay)
            await asyncio.sleep(delay)
            continue
        return interpret_response(response)
    raise AssertionError("unreachable: the loop returns on its last attempt")
