"""What went wrong with one Gemini call, and whether trying again can help.

The classes are the worker's `error` values (shared.models.FailureReason); the dispatcher reacts to
them (quota_exhausted and auth_failed pause the queue). Sources of the facts used here:
- google/genai/errors.py: a non-200 answer raises ClientError (4xx) or ServerError (5xx) whose
  `.code`, `.status`, `.message` come from the JSON body and `.details` is that whole body;
- the Gemini API troubleshooting and rate-limit pages (ai.google.dev/gemini-api/docs/troubleshooting,
  /rate-limits): 429 RESOURCE_EXHAUSTED carries google.rpc.QuotaFailure (violations[].quotaId, e.g.
  `GenerateRequestsPerMinutePerProjectPerModel` or `…PerDay…`), Help and RetryInfo (retryDelay "37s");
  daily quotas reset at midnight Pacific time; no key is 403 PERMISSION_DENIED, a bad key 400
  INVALID_ARGUMENT with google.rpc.ErrorInfo reason API_KEY_INVALID, billing 400 FAILED_PRECONDITION;
- google/genai/types.py FinishReason / BlockedReason, and the image-generation docs: NO_IMAGE and
  IMAGE_OTHER are often transient, the safety and recitation reasons are final; Gemini 3 sends
  interim images marked `thought: true` before the final one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import aiohttp
import httpx
from google.genai import errors, types

FailureReason = Literal[
    "safety_blocked", "no_image", "upstream_error", "rate_limited", "quota_exhausted", "auth_failed", "bad_request"
]
# Every other call with the same key would get the same answer: the rest of the run is not sent.
RUN_WIDE_REASONS: frozenset[FailureReason] = frozenset({"quota_exhausted", "auth_failed"})

# The model refused on policy grounds (recitation: the image would reproduce protected material).
REFUSAL_FINISH_REASONS = frozenset(
    {
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
        "IMAGE_RECITATION", "RECITATION",
    }
)  # fmt: skip
# No image this time, but the same request often yields one on a second try.
FLAKY_FINISH_REASONS = frozenset({"NO_IMAGE", "IMAGE_OTHER"})
# The SDK's aiohttp transport raises asyncio/aiohttp errors; its httpx transport raises httpx ones.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (aiohttp.ClientError, httpx.TransportError)
DETAIL_MAX_CHARS = 300


class Retry(Enum):
    NEVER = "never"  # the same request fails the same way
    ONCE = "once"  # a model answer without an image that is often transient
    BACKOFF = "backoff"  # overload, rate limit or network: up to the attempts, waiting in between


@dataclass(frozen=True)
class Failure:
    reason: FailureReason
    detail: str
    retry: Retry = Retry.NEVER
    # The server's google.rpc.RetryInfo, in seconds.
    retry_after: float | None = None


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    mime_type: str


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"


# --- error bodies ----------------------------------------------------------------------------------------


def _error_details(error: errors.APIError, kind: str) -> list[dict[str, Any]]:
    """The `details[]` entries of one google.rpc type (e.g. "QuotaFailure") in the error body."""
    body = error.details
    inner = body.get("error", body) if isinstance(body, dict) else None
    details = inner.get("details") if isinstance(inner, dict) else None
    return [
        detail
        for detail in (details if isinstance(details, list) else [])
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(f".{kind}")
    ]


def quota_ids(error: errors.APIError) -> list[str]:
    """The quotaId of every QuotaFailure violation, e.g. GenerateRequestsPerDayPerProjectPerModel-FreeTier."""
    return [
        str(violation["quotaId"])
        for detail in _error_details(error, "QuotaFailure")
        for violation in detail.get("violations") or []
        if isinstance(violation, dict) and violation.get("quotaId")
    ]


def error_reasons(error: errors.APIError) -> list[str]:
    """The google.rpc.ErrorInfo reasons, e.g. API_KEY_INVALID."""
    return [str(detail["reason"]) for detail in _error_details(error, "ErrorInfo") if detail.get("reason")]


def retry_delay_hint(error: errors.APIError) -> float | None:
    """Seconds from a google.rpc.RetryInfo in the error body ("37s", "0.5s"), if the server sent one."""
    for detail in _error_details(error, "RetryInfo"):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", str(detail.get("retryDelay", "")))
        if match:
            return float(match.group(1))
    return None


def _api_error(error: errors.APIError) -> Failure:
    code = error.code
    summary = f"{code} {error.status or ''}".strip()
    message = error.message or ""
    if isinstance(error, errors.ServerError) or code >= 500 or code == 408:
        return Failure("upstream_error", short(f"{summary}: {message}"), Retry.BACKOFF)
    if code == 429:
        quotas = quota_ids(error)
        daily = [quota for quota in quotas if "PerDay" in quota]
        if daily:
            # Retrying is pointless until the quota resets, possibly hours away.
            detail = f"{summary}: daily quota {daily[0]} exhausted (resets at midnight Pacific time): {message}"
            return Failure("quota_exhausted", short(detail))
        quota = f" ({quotas[0]})" if quotas else ""
        return Failure("rate_limited", short(f"{summary}{quota}: {message}"), Retry.BACKOFF, retry_delay_hint(error))
    reasons = error_reasons(error)
    because = f" ({', '.join(reasons)})" if reasons else ""
    if code in (401, 403) or "API_KEY_INVALID" in reasons or error.status == "FAILED_PRECONDITION":
        return Failure("auth_failed", short(f"{summary}{because}: {message}"))
    # 404 (unknown model), other 400s (unsupported parameter): this request can never succeed.
    return Failure("bad_request", short(f"{summary}{because}: {message}"))


def classify_error(exc: BaseException, timeout: float | None = None) -> Failure:
    """A raised call: an HTTP error from the API, a timeout, a broken connection, or something else."""
    if isinstance(exc, errors.APIError):
        return _api_error(exc)
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        after = f" after {timeout:.3g} s" if timeout is not None else ""
        return Failure("upstream_error", f"timed out{after}", Retry.BACKOFF)
    description = short(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    if isinstance(exc, TRANSIENT_EXCEPTIONS):
        return Failure("upstream_error", description, Retry.BACKOFF)
    # Not a network or API problem (a response the SDK cannot parse...): repeating would not help.
    return Failure("upstream_error", description)


# --- 200 answers -----------------------------------------------------------------------------------------


def _enum_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def classify_response(response: types.GenerateContentResponse) -> GeneratedImage | Failure:
    """The image of a 200 answer, or why there is none."""
    parts = response.parts or []
    images = [(part, part.inline_data) for part in parts if part.inline_data is not None and part.inline_data.data]
    # Gemini 3 sends interim thought images before the final one: the last non-thought image is the answer.
    final = [inline for part, inline in images if not part.thought]
    if final and final[-1].data:
        return GeneratedImage(data=final[-1].data, mime_type=final[-1].mime_type or "image/png")

    feedback = response.prompt_feedback
    block_reason = _enum_name(feedback.block_reason) if feedback else None
    if block_reason:
        message = feedback.block_reason_message if feedback else None
        return Failure("safety_blocked", short(f"prompt blocked: {block_reason}" + (f": {message}" if message else "")))
    candidate = response.candidates[0] if response.candidates else None
    finish = _enum_name(candidate.finish_reason) if candidate else None
    if finish in REFUSAL_FINISH_REASONS:
        message = candidate.finish_message if candidate else None
        return Failure("safety_blocked", short(f"finish reason {finish}" + (f": {message}" if message else "")))
    retry = Retry.ONCE if finish in FLAKY_FINISH_REASONS else Retry.NEVER
    if images:
        what = f"only {len(images)} interim thought image(s) (thought: true), no final image"
    else:
        what = "no image in response"
    text = " ".join(part.text for part in parts if part.text and not part.thought)
    detail = f"{what} (finish reason {finish or 'none'})" + (f": {text}" if text else "")
    return Failure("no_image", short(detail), retry)
