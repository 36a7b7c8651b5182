"""A local stand-in for Gemini's `models/{model}:generateContent` image generation, with fault injection.

    python -m deploy.emulators.gemini --host 127.0.0.1 --port 8090 [--latency-ms 0] [--image-px 256]

Speaks the real wire format (camelCase and snake_case, standard and URL-safe base64) so the real
google-genai client can be pointed at it with HttpOptions(base_url=..., api_version="v1beta").

Faults, per call, from directives in the prompt text:
    [emu:safety]     finishReason IMAGE_SAFETY, no image
    [emu:blocked]    promptFeedback.blockReason PROHIBITED_CONTENT, no candidates
    [emu:text-only]  a text part only
    [emu:429xN]      the first N calls with this exact prompt text get 429 (likewise 500xN, 503xN)
    [emu:sleep=MS]   answer MS milliseconds late
or at random, from POST /_emulator/config {"latency_ms", "error_rate", "rate_limit_rate", "timeout_rate"};
GET /_emulator/stats and POST /_emulator/reset observe and restore it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import io
import json
import random
import re
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from deploy.processes import Process, base_env, free_port, python, wait_http

DIRECTIVE = re.compile(r"\[emu:([a-z0-9-]+?)(?:x(\d+)|=(\d+))?\]")
ERROR_STATUSES = {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
ERROR_MESSAGES = {
    429: "Resource exhausted. Please try again later.",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}
TOKENS_PER_IMAGE_IN = 258
TOKENS_PER_IMAGE_OUT = 1290
HANG_SECONDS = 600.0


@dataclass
class EmulatorConfig:
    latency_ms: int = 0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0


@dataclass
class EmulatorState:
    defaults: EmulatorConfig
    image_px: int
    config: EmulatorConfig = field(default_factory=EmulatorConfig)
    calls: int = 0
    images: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    # (status code, prompt text) -> how many errors that directive has already produced.
    directive_hits: Counter[tuple[int, str]] = field(default_factory=Counter)
    serial: int = 0
    # Bumped by reset, so a call still hanging from before a reset does not leak into the new stats.
    epoch: int = 0

    def reset(self) -> None:
        self.epoch += 1
        self.config = replace(self.defaults)
        self.calls = self.images = self.serial = 0
        self.by_status.clear()
        self.directive_hits.clear()


STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("state", EmulatorState)


@dataclass
class ParsedRequest:
    model: str
    text: str
    images: list[bytes]
    aspect_ratio: str | None


class BadRequest(Exception):
    pass


# --- wire helpers ----------------------------------------------------------------------------------------


def error_response(code: int, status: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=code)


def upstream_error(code: int) -> web.Response:
    details = None
    if code == 429:
        details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "0.2s"}]
    return error_response(code, ERROR_STATUSES[code], ERROR_MESSAGES[code], details)


def pick(obj: dict[str, Any], camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake))


def decode_b64(data: str) -> bytes:
    """Standard or URL-safe base64, padded or not: clients differ."""
    normalized = data.strip().replace("-", "+").replace("_", "/")
    normalized += "=" * (-len(normalized) % 4)
    try:
        return base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"Invalid value at inline_data.data: {exc}") from exc


def parse_request(model: str, body: Any) -> ParsedRequest:
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
        raise BadRequest("contents is required")
    texts: list[str] = []
    images: list[bytes] = []
    for content in body["contents"]:
        for part in (content or {}).get("parts") or []:
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            inline = pick(part, "inlineData", "inline_data")
            if inline is not None:
                if not pick(inline, "mimeType", "mime_type"):
                    raise BadRequest("inline_data.mime_type is required")
                images.append(decode_b64(str(inline.get("data", ""))))
    generation = pick(body, "generationConfig", "generation_config") or {}
    image_config = pick(generation, "imageConfig", "image_config") or {}
    aspect_ratio = pick(image_config, "aspectRatio", "aspect_ratio")
    return ParsedRequest(model=model, text="\n".join(texts), images=images, aspect_ratio=aspect_ratio)


def usage(request: ParsedRequest, images_out: int) -> dict[str, int]:
    prompt_tokens = len(request.text) // 4 + TOKENS_PER_IMAGE_IN * len(request.images)
    output_tokens = TOKENS_PER_IMAGE_OUT * images_out
    return {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": prompt_tokens + output_tokens,
    }


def candidate(parts: list[dict[str, Any]] | None, finish_reason: str) -> dict[str, Any]:
    result: dict[str, Any] = {"finishReason": finish_reason, "index": 0}
    if parts is not None:
        result["content"] = {"role": "model", "parts": parts}
    return result


# --- the picture -----------------------------------------------------------------------------------------


def image_size(px: int, aspect_ratio: str | None) -> tuple[int, int]:
    """The longer side is `px`; the other follows the requested ratio."""
    match = re.fullmatch(r"(\d+):(\d+)", aspect_ratio or "")
    w, h = (int(match.group(1)), int(match.group(2))) if match else (1, 1)
    if w <= 0 or h <= 0:
        w = h = 1
    if w >= h:
        return px, max(1, round(px * h / w))
    return max(1, round(px * w / h)), px


def render_png(text: str, references: list[bytes], serial: int, size: tuple[int, int]) -> bytes:
    """A real PNG, different on every call: colour from (prompt, references, serial), text and thumbnails."""
    digest = hashlib.sha256(text.encode() + b"".join(references) + serial.to_bytes(8, "big")).digest()
    background = (digest[0], digest[1], digest[2])
    ink = (0, 0, 0) if sum(background) > 384 else (255, 255, 255)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, size[0] // 24))
    chars_per_line = max(8, size[0] // max(6, size[0] // 40))
    lines = textwrap.wrap(text, chars_per_line)[:8] or ["(no prompt)"]
    draw.multiline_text((6, 6), "\n".join(lines), fill=ink, font=font)
    thumb_side = max(8, min(size) // 4)
    x = 6
    for data in references:
        try:
            with Image.open(io.BytesIO(data)) as ref:
                thumb = ref.convert("RGB")
                thumb.thumbnail((thumb_side, thumb_side))
        except (UnidentifiedImageError, OSError, ValueError):
            thumb = Image.new("RGB", (thumb_side, thumb_side), (128, 128, 128))
        if x + thumb.width > size[0]:
            break
        image.paste(thumb, (x, size[1] - thumb.height - 6))
        x += thumb.width + 4
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- handlers --------------------------------------------------------------------------------------------


def directives(text: str) -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for name, count, value in DIRECTIVE.findall(text):
        found[name] = int(count or value) if (count or value) else None
    return found


def injected_error(state: EmulatorState, request: ParsedRequest, found: dict[str, int | None]) -> int | None:
    """The HTTP error this call must fail with, if any: random faults first, then prompt directives."""
    if random.random() < state.config.error_rate:
        return 503
    if random.random() < state.config.rate_limit_rate:
        return 429
    for code in ERROR_STATUSES:
        limit = found.get(str(code))
        key = (code, request.text)
        if limit is not None and state.directive_hits[key] < limit:
            state.directive_hits[key] += 1
            return code
    return None


async def generate_content(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.calls += 1
    epoch = state.epoch
    response = await _generate(request, state)
    if state.epoch == epoch:
        state.by_status[str(response.status)] += 1
    return response


async def _generate(request: web.Request, state: EmulatorState) -> web.Response:
    version = request.match_info["version"]
    model, _, method = request.match_info["tail"].partition(":")
    if version not in ("v1", "v1beta") or method != "generateContent":
        return error_response(404, "NOT_FOUND", f"Method {method or '(none)'} not found for {version}.")
    if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
        return error_response(
            401, "UNAUTHENTICATED", "Method doesn't allow unregistered callers. Please use an API Key."
        )
    try:
        parsed = parse_request(model, await request.json())
    except (BadRequest, json.JSONDecodeError, AttributeError, TypeError) as exc:
        return error_response(400, "INVALID_ARGUMENT", f"Invalid JSON payload: {exc}")

    found = directives(parsed.text)
    delay_ms = state.config.latency_ms + (found.get("sleep") or 0)
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    if random.random() < state.config.timeout_rate:
        await asyncio.sleep(HANG_SECONDS)
        return error_response(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.")
    if (code := injected_error(state, parsed, found)) is not None:
        return upstream_error(code)
    return web.json_response(await _answer(state, parsed, found))


async def _answer(state: EmulatorState, parsed: ParsedRequest, found: dict[str, int | None]) -> dict[str, Any]:
    body: dict[str, Any] = {"modelVersion": parsed.model}
    if "blocked" in found:
        body["promptFeedback"] = {"blockReason": "PROHIBITED_CONTENT"}
        body["usageMetadata"] = usage(parsed, 0)
    elif "safety" in found:
        body["candidates"] = [candidate(None, "IMAGE_SAFETY")]
        body["usageMetadata"] = usage(parsed, 0)
    elif "text-only" in found:
        parts = [{"text": "I can't create that image, but here is a description of it instead."}]
        body["candidates"] = [candidate(parts, "STOP")]
        body["usageMetadata"] = usage(parsed, 0)
    else:
        state.serial += 1
        size = image_size(state.image_px, parsed.aspect_ratio)
        # Drawing and PNG encoding are CPU work: keep the loop free for concurrent calls.
        png = await asyncio.to_thread(render_png, parsed.text, parsed.images, state.serial, size)
        state.images += 1
        part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
        body["candidates"] = [candidate([part], "STOP")]
        body["usageMetadata"] = usage(parsed, 1)
    return body


async def set_config(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        update = await request.json()
    except json.JSONDecodeError:
        return error_response(400, "INVALID_ARGUMENT", "body must be JSON")
    known = {f.name for f in fields(EmulatorConfig)}
    if not isinstance(update, dict) or set(update) - known:
        return error_response(400, "INVALID_ARGUMENT", f"allowed keys: {sorted(known)}")
    for key, value in update.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return error_response(400, "INVALID_ARGUMENT", f"{key} must be a number")
        if key.endswith("_rate") and not 0 <= value <= 1:
            return error_response(400, "INVALID_ARGUMENT", f"{key} must be within 0..1")
        if key == "latency_ms" and value < 0:
            return error_response(400, "INVALID_ARGUMENT", "latency_ms must be >= 0")
    changes: dict[str, Any] = {k: int(v) if k == "latency_ms" else float(v) for k, v in update.items()}
    state.config = replace(state.config, **changes)
    return web.json_response(asdict(state.config))


async def get_stats(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response(
        {"calls": state.calls, "by_status": dict(state.by_status), "images": state.images,
         "config": asdict(state.config)}
    )  # fmt: skip


async def reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.json_response({"ok": True})


def create_app(latency_ms: int = 0, image_px: int = 256) -> web.Application:
    defaults = EmulatorConfig(latency_ms=latency_ms)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # real inline requests go up to 20+ MB
    app[STATE_KEY] = EmulatorState(defaults=defaults, image_px=image_px, config=replace(defaults))
    app.router.add_post("/{version}/models/{tail}", generate_content)
    app.router.add_post("/_emulator/config", set_config)
    app.router.add_get("/_emulator/stats", get_stats)
    app.router.add_post("/_emulator/reset", reset)
    return app


# --- running it ------------------------------------------------------------------------------------------


def start(workdir: Path, port: int | None = None, latency_ms: int = 0, image_px: int = 256) -> tuple[Process, str]:
    """The emulator as a subprocess on a free port (tests, `make dev`, bench); returns it and its base URL."""
    port = port or free_port()
    args = python(
        "-m", "deploy.emulators.gemini", "--host", "127.0.0.1", "--port", str(port),
        "--latency-ms", str(latency_ms), "--image-px", str(image_px),
    )  # fmt: skip
    proc = Process("gemini", args, base_env(), workdir / "gemini.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_emulator/stats", proc)
    return proc, url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--image-px", type=int, default=256)
    args = parser.parse_args(argv)
    app = create_app(latency_ms=args.latency_ms, image_px=args.image_px)
    web.run_app(app, host=args.host, port=args.port, print=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
