"""The aiohttp application: POST /{v1|v1beta}/models/{model}:generateContent and the /_emulator/* routes.

One call goes: route and key check, model lookup, body size and validation (request.py), then the
admission faults Google answers at once (billing, quotas), the latency, the server faults (5xx, hangs),
and the answer (responses.py) with its picture (pictures.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import secrets
from typing import Any, Final

from aiohttp import web

from deploy.emulators.gemini import catalog, errors, responses
from deploy.emulators.gemini.catalog import ImageModel
from deploy.emulators.gemini.pictures import RealisticImages, render_small, small_size
from deploy.emulators.gemini.request import ParsedRequest, parse_request
from deploy.emulators.gemini.state import (
    STATE_KEY,
    ConfigError,
    EmulatorConfig,
    EmulatorState,
    ImageMode,
    jitter_ms,
    updated_config,
)

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


# --- checks before generating ----------------------------------------------------------------------------


def authenticate(request: web.Request, api_keys: frozenset[str] | None, revoked: tuple[str, ...] = ()) -> None:
    """The key from x-goog-api-key (what google-genai sends, _api_client.py) or ?key= (REST docs).
    A key deleted in Google's console answers like one that never existed."""
    key = (request.headers.get("x-goog-api-key") or request.query.get("key") or "").strip()
    if not key:
        raise errors.bad_oauth_token() if request.headers.get("Authorization") else errors.no_key()
    if (api_keys is not None and key not in api_keys) or key in revoked:
        raise errors.api_key_invalid()


def lookup_model(model: str, version: str) -> ImageModel | None:
    """The image model's spec, None for a known text-only model; an unknown model is a 404."""
    spec = catalog.IMAGE_MODELS.get(model)
    if spec is None and model not in catalog.TEXT_MODELS:
        raise errors.model_not_found(model, version)
    return spec


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, or Google's JSON 400 when it is over the limit: the declared length is checked before
    reading, and aiohttp's own refusal of a longer (chunked) body is turned into the same 400."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.request_too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.request_too_large(limit) from None


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


async def picture(request: web.Request, parsed: ParsedRequest, spec: ImageModel, mode: ImageMode) -> str:
    """One picture, base64: see pictures.py for the two modes."""
    state = request.app[STATE_KEY]
    state.serial += 1
    if mode == "realistic":
        size = spec.resolution(parsed.aspect_ratio, parsed.image_size)
        png = await request.app[PICTURES_KEY].get(size, secrets.token_hex(8))
        return await asyncio.to_thread(lambda: base64.b64encode(png).decode())
    size = small_size(state.image_px, parsed.aspect_ratio)
    serial = state.serial

    def draw() -> str:
        return base64.b64encode(render_small(parsed.text, parsed.images, serial, size)).decode()

    # Drawing and PNG encoding are CPU work: keep the loop free for concurrent calls.
    return await asyncio.to_thread(draw)


async def answer(request: web.Request, parsed: ParsedRequest, spec: ImageModel | None, outcome: str) -> dict[str, Any]:
    state = request.app[STATE_KEY]
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
        part = responses.image_part(await picture(request, parsed, spec, mode), thought=True)
        body["candidates"] = [responses.candidate([part], "STOP")]
        body["usageMetadata"] = responses.usage(parsed, thought_tokens=thoughts or catalog.THOUGHT_TOKENS)
    elif outcome == "image":
        parts: list[dict[str, Any]] = []
        if spec.thought_images:
            if parsed.include_thoughts:
                parts.append({"text": responses.THOUGHT_SUMMARY, "thought": True})
            parts.append(responses.image_part(await picture(request, parsed, spec, mode), thought=True))
        caption = ""
        if parsed.modalities is None or "TEXT" in parsed.modalities:
            caption = responses.IMAGE_CAPTION
            parts.append({"text": caption})
        final = await picture(request, parsed, spec, mode)
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


# --- routes ----------------------------------------------------------------------------------------------


async def generate_content(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls += 1
    epoch = state.epoch
    try:
        response = await _generate(request, state)
    except errors.ApiError as error:
        if state.epoch == epoch:
            state.by_error[error.kind] += 1
        response = error.response()
    if state.epoch == epoch:
        state.by_status[str(response.status)] += 1
    return response


async def _generate(request: web.Request, state: EmulatorState) -> web.Response:
    version = request.match_info["version"]
    model, _, method = request.match_info["tail"].partition(":")
    if version not in catalog.API_VERSIONS or method != "generateContent":
        raise errors.method_not_found(version, method)
    authenticate(request, state.api_keys, state.config.revoked_keys)
    spec = lookup_model(model, version)
    raw = await read_body(request, state.max_request_bytes)
    if len(raw) > PARSE_IN_THREAD_BYTES:
        parsed = await asyncio.to_thread(parse_request, raw, model, spec)
    else:
        parsed = parse_request(raw, model, spec)

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
            await asyncio.sleep(HANG_SECONDS)
            raise errors.deadline_exceeded()
        if (fault := server_fault(state, parsed, found)) is not None:
            raise fault
        body = await answer(request, parsed, spec, outcome)
    except BaseException:
        if outcome == "image" and state.quota_epoch == quota_epoch:
            state.quota_images -= 1
        raise
    return web.Response(text=await asyncio.to_thread(json.dumps, body), content_type="application/json")


async def set_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        state.config = updated_config(state.config, await request.json())
    except json.JSONDecodeError:
        return errors.invalid_argument("body must be JSON").response()
    except ConfigError as exc:
        return errors.invalid_argument(str(exc)).response()
    return web.json_response(state.stats()["config"])


async def get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE_KEY].stats())


async def reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


async def reset_quota(request: web.Request) -> web.Response:
    """Like the daily quota's reset at midnight Pacific time: counted images start again from zero."""
    request.app[STATE_KEY].reset_quota()
    return web.json_response({"ok": True})


def create_app(
    latency_ms: int = 0,
    image_px: int = 256,
    api_keys: list[str] | tuple[str, ...] | frozenset[str] | None = None,
    image_mode: ImageMode = "small",
    max_request_bytes: int = catalog.MAX_REQUEST_BYTES,
) -> web.Application:
    """The emulator. `api_keys`: only these keys work (none given: any non-empty key does)."""
    defaults = EmulatorConfig(latency_ms=latency_ms, image_mode=image_mode)
    # client_max_size = the limit: aiohttp refuses a longer body while reading it, read_body answers JSON.
    app = web.Application(client_max_size=max_request_bytes)
    app[STATE_KEY] = EmulatorState(
        defaults=defaults, image_px=image_px, api_keys=frozenset(api_keys) if api_keys else None,
        max_request_bytes=max_request_bytes, config=EmulatorConfig(**vars(defaults)),
    )  # fmt: skip
    app[PICTURES_KEY] = RealisticImages()
    app.router.add_post("/{version}/models/{tail}", generate_content)
    app.router.add_post("/_emulator/config", set_config)
    app.router.add_get("/_emulator/stats", get_stats)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_post("/_emulator/quota/reset", reset_quota)
    return app
