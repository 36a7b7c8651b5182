"""One generateContent request, from its body to its answer: parse and validate (request.py), the
directives in its prompt, the admission faults Google answers at once (billing, quotas), the latency, the
server faults (5xx, hangs), and the answer (responses.py) with its picture (pictures.py).

`generate` is the one path for both callers: POST …:generateContent (app.py) answers its result over
HTTP, and a batch (batches.py) stores it as one request's response, or its error as that request's error.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import secrets
from typing import Any, Final

from aiohttp import web

from deploy.emulators.gemini import catalog, errors, responses
from deploy.emulators.gemini.catalog import ImageModel
from deploy.emulators.gemini.files import FILES_KEY
from deploy.emulators.gemini.pictures import RealisticImages, render_small, small_size
from deploy.emulators.gemini.request import ParsedRequest, parse_request
from deploy.emulators.gemini.state import STATE_KEY, EmulatorState, ImageMode, jitter_ms

DIRECTIVE: Final = re.compile(r"\[emu:([a-z0-9-]+?)(?:x(\d+)|=(\d+))?\]")
HANG_SECONDS: Final = 600.0
# Bodies above this are parsed (JSON, base64, image headers) in a thread, off the event loop.
PARSE_IN_THREAD_BYTES: Final = 256 * 1024
# Directives that end a call with this finish reason and no image.
FINISH_DIRECTIVES: Final = {"safety": "IMAGE_SAFETY", "recitation": "IMAGE_RECITATION", "max-tokens": "MAX_TOKENS"}
# The same, counted: [emu:no-imagex2] only for the first 2 calls with that prompt.
COUNTED_FINISH_DIRECTIVES: Final = {"no-image": "NO_IMAGE", "image-other": "IMAGE_OTHER"}
PICTURES_KEY: web.AppKey[RealisticImages] = web.AppKey("pictures", RealisticImages)


def directives(text: str) -> dict[str, int | None]:
    """[emu:NAME] -> None, [emu:NAMExN] and [emu:NAME=N] -> N."""
    return {name: int(count or value) if (count or value) else None for name, count, value in DIRECTIVE.findall(text)}


# --- faults ----------------------------------------------------------------------------------------------


def admission_fault(
    state: EmulatorState, parsed: ParsedRequest, found: dict[str, int | None]
) -> errors.ApiError | None:
    """Refusals the real API gives before any work: billing, the daily quota, the per-minute quota."""
    if "billing" in found:
        return errors.billing()
    if "quota-day" in found:
        return errors.quota_exceeded(parsed.model, "day")
    limit = state.config.daily_quota_images
    if limit and state.quota_images >= limit:
        return errors.quota_exceeded(parsed.model, "day", limit)
    if random.random() < state.config.rate_limit_rate:
        return errors.quota_exceeded(parsed.model, "minute")
    for name in ("429", "quota-minute"):
        if name in found and state.take_hit(name, parsed.text, found[name]):
            return errors.quota_exceeded(parsed.model, "minute")
    return None


def server_fault(state: EmulatorState, parsed: ParsedRequest, found: dict[str, int | None]) -> errors.ApiError | None:
    if random.random() < state.config.error_rate:
        return errors.unavailable()
    for code, build in errors.SERVER_FAULTS.items():
        name = str(code)
        if name in found and state.take_hit(name, parsed.text, found[name]):
            return build()
    return None


def plan_outcome(
    state: EmulatorState, parsed: ParsedRequest, spec: ImageModel | None, found: dict[str, int | None]
) -> str:
    """What a successful call answers: "image", "thought-only", "text", "blocked" or a finish reason."""
    if spec is None or parsed.modalities == frozenset({"TEXT"}):
        return "text"
    if "blocked" in found:
        return "blocked"
    for name, reason in FINISH_DIRECTIVES.items():
        if name in found:
            return reason
    for name, reason in COUNTED_FINISH_DIRECTIVES.items():
        if name in found and state.take_hit(name, parsed.text, found[name]):
            return reason
    if "text-only" in found:
        return "text"
    return "thought-only" if "thought-only" in found else "image"


# --- the answer ------------------------------------------------------------------------------------------


async def picture(app: web.Application, parsed: ParsedRequest, spec: ImageModel, mode: ImageMode) -> str:
    """One picture, base64: see pictures.py for the two modes."""
    state = app[STATE_KEY]
    state.serial += 1
    if mode == "realistic":
        size = spec.resolution(parsed.aspect_ratio, parsed.image_size)
        png = await app[PICTURES_KEY].get(size, secrets.token_hex(8))
        return await asyncio.to_thread(lambda: base64.b64encode(png).decode())
    size = small_size(state.image_px, parsed.aspect_ratio)
    serial = state.serial

    def draw() -> str:
        return base64.b64encode(render_small(parsed.text, parsed.images, serial, size)).decode()

    # Drawing and PNG encoding are CPU work: keep the loop free for concurrent calls.
    return await asyncio.to_thread(draw)


async def answer(app: web.Application, parsed: ParsedRequest, spec: ImageModel | None, outcome: str) -> dict[str, Any]:
    state = app[STATE_KEY]
    mode = state.config.image_mode
    body = responses.envelope(parsed.model)
    thoughts = catalog.THOUGHT_TOKENS if spec is not None and spec.thought_images else 0
    if outcome == "text":
        text = responses.TEXT_MODEL_ANSWER if spec is None else responses.TEXT_ONLY_ANSWER
        body["candidates"] = [responses.candidate([{"text": text}], "STOP")]
        body["usageMetadata"] = responses.usage(parsed, text_out=text)
    elif outcome == "blocked":
        body["promptFeedback"] = {"blockReason": "PROHIBITED_CONTENT"}
        body["usageMetadata"] = responses.usage(parsed)
    elif spec is None:
        raise AssertionError(f"outcome {outcome} needs an image model")
    elif outcome == "thought-only":
        # Gemini 3's interim image alone: a client taking any inline image would take a draft.
        part = responses.image_part(await picture(app, parsed, spec, mode), thought=True)
        body["candidates"] = [responses.candidate([part], "STOP")]
        body["usageMetadata"] = responses.usage(parsed, thought_tokens=thoughts or catalog.THOUGHT_TOKENS)
    elif outcome == "image":
        parts: list[dict[str, Any]] = []
        if spec.thought_images:
            if parsed.include_thoughts:
                parts.append({"text": responses.THOUGHT_SUMMARY, "thought": True})
            parts.append(responses.image_part(await picture(app, parsed, spec, mode), thought=True))
        caption = ""
        if parsed.modalities is None or "TEXT" in parsed.modalities:
            caption = responses.IMAGE_CAPTION
            parts.append({"text": caption})
        final = await picture(app, parsed, spec, mode)
        parts.append(responses.image_part(final, signed=spec.thought_images))
        state.images += 1
        body["candidates"] = [responses.candidate(parts, "STOP")]
        body["usageMetadata"] = responses.usage(
            parsed, text_out=caption, image_tokens=spec.image_tokens(parsed.image_size), thought_tokens=thoughts
        )
    else:
        body["candidates"] = [responses.candidate(None, outcome)]
        body["usageMetadata"] = responses.usage(parsed)
    finish = body["candidates"][0]["finishReason"] if "candidates" in body else "PROMPT_BLOCKED"
    state.by_finish_reason[finish] += 1
    return body


# --- one request -----------------------------------------------------------------------------------------


async def parse(
    app: web.Application, body: bytes | dict[str, Any], model: str, spec: ImageModel | None
) -> ParsedRequest:
    """request.parse_request with fileData parts read from the Files API; in a thread when it is heavy
    (a large body, a decoded batch request, or a file to read from disk)."""
    files = app[FILES_KEY].read_image
    heavy = (
        not isinstance(body, bytes)
        or len(body) > PARSE_IN_THREAD_BYTES
        or any(name in body for name in (b"file_data", b"fileData"))
    )
    if heavy:
        return await asyncio.to_thread(parse_request, body, model, spec, files)
    return parse_request(body, model, spec, files)


async def generate(
    app: web.Application, body: bytes | dict[str, Any], model: str, spec: ImageModel | None, *, in_batch: bool = False
) -> dict[str, Any]:
    """The GenerateContentResponse for one request, or errors.ApiError with what Google refuses it with.

    `in_batch`: one request of a batch. Everything applies as for a call (validation, directives, quotas,
    the configured latency and fault rates), except that a random hang (`timeout_rate`) is not waited
    out: the request ends at once with DEADLINE_EXCEEDED, as a call's hang ends with a 504.
    """
    state = app[STATE_KEY]
    parsed = await parse(app, body, model, spec)
    found = directives(parsed.text)
    if (fault := admission_fault(state, parsed, found)) is not None:
        raise fault
    outcome = plan_outcome(state, parsed, spec, found)
    # The image is counted against the daily quota now, so concurrent calls cannot overshoot it, and
    # given back if the call ends without one.
    quota_epoch = state.quota_epoch
    if outcome == "image":
        state.quota_images += 1
    try:
        delay_ms = state.config.latency_ms + jitter_ms(state.config.latency_jitter_ms) + (found.get("sleep") or 0)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if random.random() < state.config.timeout_rate:
            if not in_batch:
                await asyncio.sleep(HANG_SECONDS)
            raise errors.deadline_exceeded()
        if (fault := server_fault(state, parsed, found)) is not None:
            raise fault
        return await answer(app, parsed, spec, outcome)
    except BaseException:
        if outcome == "image" and state.quota_epoch == quota_epoch:
            state.quota_images -= 1
        raise
