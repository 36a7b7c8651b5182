"""The aiohttp application: POST /{v1|v1beta}/models/{model}:generateContent, the Batch API
(batches.py), the Files API (files.py) and the /_emulator/* routes.

One generateContent call goes: route and key check, model lookup, body size (access.py), then
generation.generate: validation (request.py), the admission faults Google answers at once (billing,
quotas), the latency, the server faults (5xx, hangs), and the answer (responses.py) with its picture
(pictures.py). A batch runs each of its requests through the same generation.generate.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from aiohttp import web

from deploy.emulators.gemini import batches, catalog, errors, files
from deploy.emulators.gemini.access import authenticate, lookup_model, read_body
from deploy.emulators.gemini.batches import BATCHES_KEY, BatchStore
from deploy.emulators.gemini.files import FILES_KEY, FileStore
from deploy.emulators.gemini.generation import PICTURES_KEY, generate
from deploy.emulators.gemini.pictures import RealisticImages
from deploy.emulators.gemini.state import (
    STATE_KEY,
    ConfigError,
    EmulatorConfig,
    EmulatorState,
    ImageMode,
    updated_config,
)

# --- routes ----------------------------------------------------------------------------------------------


async def model_method(request: web.Request) -> web.StreamResponse:
    """POST /{version}/models/{model}:{method}: generateContent, or batchGenerateContent (batches.py)."""
    if request.match_info["tail"].partition(":")[2] == "batchGenerateContent":
        return await batches.create(request)
    return await generate_content(request)


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
    body = await generate(request.app, raw, model, spec)
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
    stats = request.app[STATE_KEY].stats()
    stats["batches_by_state"] = request.app[BATCHES_KEY].by_state()
    return web.json_response(stats)


async def reset(request: web.Request) -> web.Response:
    """Configuration and counters back to the start, and every batch (stopped) and file gone."""
    await request.app[BATCHES_KEY].reset()
    request.app[FILES_KEY].reset()
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
    *,
    batch_pending_seconds: float = EmulatorConfig.batch_pending_seconds,
    batch_running_seconds: float = EmulatorConfig.batch_running_seconds,
    batch_expire_seconds: float = EmulatorConfig.batch_expire_seconds,
    file_ttl_seconds: float = EmulatorConfig.file_ttl_seconds,
    max_batch_request_bytes: int = catalog.MAX_BATCH_REQUEST_BYTES,
) -> web.Application:
    """The emulator. `api_keys`: only these keys work (none given: any non-empty key does)."""
    defaults = EmulatorConfig(
        latency_ms=latency_ms, image_mode=image_mode, batch_pending_seconds=batch_pending_seconds,
        batch_running_seconds=batch_running_seconds, batch_expire_seconds=batch_expire_seconds,
        file_ttl_seconds=file_ttl_seconds,
    )  # fmt: skip
    # client_max_size = the limit: aiohttp refuses a longer body while reading it, read_body answers JSON.
    # (Uploaded files are streamed to disk, past this limit: files.py.)
    app = web.Application(client_max_size=max_request_bytes)
    state = EmulatorState(
        defaults=defaults, image_px=image_px, api_keys=frozenset(api_keys) if api_keys else None,
        max_request_bytes=max_request_bytes, config=EmulatorConfig(**vars(defaults)),
    )  # fmt: skip
    app[STATE_KEY] = state
    app[PICTURES_KEY] = RealisticImages()
    app[FILES_KEY] = FileStore(Path(tempfile.mkdtemp(prefix="gemini-emulator-files-")), state)
    app[BATCHES_KEY] = BatchStore(app, max_request_bytes=max_batch_request_bytes)
    app.on_cleanup.append(_close_stores)
    app.router.add_post("/{version}/models/{tail}", model_method)
    batches.add_routes(app)
    files.add_routes(app)
    app.router.add_post("/_emulator/config", set_config)
    app.router.add_get("/_emulator/stats", get_stats)
    app.router.add_post("/_emulator/reset", reset)
    app.router.add_post("/_emulator/quota/reset", reset_quota)
    return app


async def _close_stores(app: web.Application) -> None:
    await app[BATCHES_KEY].reset()
    app[FILES_KEY].close()
