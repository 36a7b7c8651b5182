"""Gemini image generation for the worker: one shared client, and the attempts of one image.

Deployed alone with handler.py (no `shared` package in the image), so it depends only on the SDK.
What each failure means and whether it is retried is decided in failures.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from failures import (
    RUN_WIDE_REASONS,
    Failure,
    FailureReason,
    GeneratedImage,
    Retry,
    classify_error,
    classify_response,
    short,
)
from google import genai
from google.genai import types
from run_control import Deadline, RunBreaker
from worker_settings import WorkerSettings

log = logging.getLogger("bunch.worker.gemini")

# A retry that would get less than this share of its timeout before the run's deadline is not sent:
# it could not finish, and Gemini may still bill the image it starts.
MIN_CALL_SHARE = 0.1
# The SDK's own per-request timeout trails ours, so a slow call always ends as our TimeoutError.
SDK_TIMEOUT_MARGIN_SECONDS = 1.0


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
    # The timeout is not part of the key: build_config sets each call's own.
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
    # Summed over every answered attempt: each one was billed.
    prompt_tokens: int = 0
    output_tokens: int = 0


def build_config(
    aspect_ratio: str | None, image_size: str | None, timeout_seconds: float | None = None
) -> types.GenerateContentConfig:
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        # No tools are passed; disabling AFC also drops the SDK's per-call "AFC is enabled" log line.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    if timeout_seconds is not None:
        # Per request (google/genai/_api_client.py patch_http_options): the shared client's timeout was
        # frozen when it was built, a run's limits may allow longer. It also sets X-Server-Timeout.
        config.http_options = types.HttpOptions(
            timeout=math.ceil((timeout_seconds + SDK_TIMEOUT_MARGIN_SECONDS) * 1000)
        )
    if aspect_ratio is not None or image_size is not None:
        # Only the fields the run asked for: unset ones leave the model's own defaults in charge.
        config.image_config = types.ImageConfig()
        if aspect_ratio is not None:
            config.image_config.aspect_ratio = aspect_ratio
        if image_size is not None:
            config.image_config.image_size = image_size
    return config


class _Attempts:
    """The running tally of one image's attempts: tokens billed so far and the answer to give."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.output_tokens = 0

    def count(self, response: types.GenerateContentResponse) -> None:
        usage = response.usage_metadata
        if usage:
            self.prompt_tokens += usage.prompt_token_count or 0
            self.output_tokens += usage.candidates_token_count or 0

    def success(self, image: GeneratedImage) -> ImageResult:
        return ImageResult(
            ok=True, data=image.data, mime_type=image.mime_type,
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
        )  # fmt: skip

    def failure(self, reason: FailureReason, detail: str) -> ImageResult:
        return ImageResult(
            ok=False, error=reason, detail=short(detail),
            prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
        )  # fmt: skip


def _attempts(count: int) -> str:
    return f"{count} attempt" + ("" if count == 1 else "s")


def _stopped(tally: _Attempts, breaker: RunBreaker, sent: int) -> ImageResult:
    assert breaker.reason is not None
    what = "not attempted" if sent == 0 else f"not retried after {_attempts(sent)}"
    return tally.failure(breaker.reason, f"{what}: {breaker.detail}")


async def generate_image(
    settings: WorkerSettings,
    model: str,
    prompt: str,
    references: Sequence[Reference],
    aspect_ratio: str | None = None,
    image_size: str | None = None,
    deadline: Deadline | None = None,
    breaker: RunBreaker | None = None,
) -> ImageResult:
    """One image: Gemini calls until one answers with it, a failure is final, the attempts run out,
    the deadline leaves no room for another, or the breaker trips. Never raises for upstream problems."""
    deadline = deadline or Deadline(None)
    breaker = breaker or RunBreaker()
    client = get_client(settings)
    contents: list[Any] = [prompt]
    contents += [types.Part.from_bytes(data=ref.data, mime_type=ref.mime_type) for ref in references]
    tally = _Attempts()
    retried_flaky = False
    for attempt in range(1, settings.max_attempts + 1):
        if breaker.tripped:
            return _stopped(tally, breaker, attempt - 1)
        timeout = deadline.cap(settings.timeout_seconds)
        if timeout <= 0:
            return tally.failure("upstream_error", f"not attempted: {deadline.describe()} was used up")
        config = build_config(aspect_ratio, image_size, timeout)
        failure: Failure
        try:
            # The authoritative bound: the run's deadline may be nearer than the configured timeout.
            async with asyncio.timeout(timeout):
                response = await client.aio.models.generate_content(model=model, contents=contents, config=config)
        except Exception as exc:
            failure = classify_error(exc, timeout)
            if failure.reason in RUN_WIDE_REASONS:
                log.warning("%s: the run's other items will not be sent: %s", failure.reason, failure.detail)
                breaker.trip(failure.reason, failure.detail)
        else:
            tally.count(response)
            outcome = classify_response(response)
            if isinstance(outcome, GeneratedImage):
                return tally.success(outcome)
            failure = outcome

        # The handler logs each item's final outcome; only retries are logged here.
        if failure.retry is Retry.NEVER:
            return tally.failure(failure.reason, failure.detail)
        if failure.retry is Retry.ONCE and retried_flaky:
            return tally.failure(failure.reason, f"again after one retry: {failure.detail}")
        if attempt == settings.max_attempts:
            return tally.failure(failure.reason, f"gave up after {_attempts(attempt)}: {failure.detail}")
        if failure.retry is Retry.ONCE:
            # A model answer, not an overload: nothing to wait for.
            retried_flaky, delay = True, 0.0
        else:
            hint = failure.retry_after
            delay = backoff_delay(attempt, settings.backoff_base_seconds, settings.backoff_max_seconds, hint)
        if not deadline.allows(delay, then=MIN_CALL_SHARE * settings.timeout_seconds):
            detail = f"gave up after {_attempts(attempt)}, {deadline.describe()} leaves no room for another"
            return tally.failure(failure.reason, f"{detail}: {failure.detail}")
        log.info("gemini attempt %d failed (%s), retrying in %.2fs", attempt, failure.detail, delay)
        if await breaker.sleep(delay):
            return _stopped(tally, breaker, attempt)
    raise AssertionError("unreachable: the loop returns on its last attempt")
