"""Who may call and what they may send: the API key, the model, the body's size, and the random refusals
of the Batch and Files endpoints. generateContent (app.py) and the Batch and Files routes (batches.py,
files.py) share these checks, so a key, model or size is refused the same way on every route.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from aiohttp import web

from deploy.emulators.gemini import catalog, errors
from deploy.emulators.gemini.catalog import ImageModel
from deploy.emulators.gemini.state import STATE_KEY, EmulatorState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authenticate(request: web.Request, api_keys: frozenset[str] | None, revoked: tuple[str, ...] = ()) -> None:
    """The key from x-goog-api-key (what google-genai sends, _api_client.py) or ?key= (REST docs).
    A key deleted in Google's console answers like one that never existed."""
    key = (request.headers.get("x-goog-api-key") or request.query.get("key") or "").strip()
    if not key:
        raise errors.bad_oauth_token() if request.headers.get("Authorization") else errors.no_key()
    if (api_keys is not None and key not in api_keys) or key in revoked:
        raise errors.api_key_invalid()


def lookup_model(model: str, version: str, method: str = "generateContent") -> ImageModel | None:
    """The image model's spec, None for a known text-only model; an unknown model is a 404."""
    spec = catalog.IMAGE_MODELS.get(model)
    if spec is None and model not in catalog.TEXT_MODELS:
        raise errors.model_not_found(model, version, method)
    return spec


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, or Google's JSON 400 when it is over the limit: the declared length is checked before
    reading, and aiohttp's own refusal of a longer (chunked) body is turned into the same 400."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.request_too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.request_too_large(limit) from None
    if len(raw) > limit:  # a chunked body under the app's own cap but over this route's limit
        raise errors.request_too_large(limit)
    return raw


def random_fault(state: EmulatorState) -> errors.ApiError | None:
    """The configured random refusals, on the Batch and Files endpoints as on generateContent:
    `rate_limit_rate` a per-minute 429, `error_rate` a 503."""
    if random.random() < state.config.rate_limit_rate:
        return errors.quota_exceeded(None, "minute")
    if random.random() < state.config.error_rate:
        return errors.unavailable()
    return None


def api_endpoint(handler: Handler, *, keyed: bool = True) -> Handler:
    """A Batch or Files route: its API version, the key (unless `keyed` is False: an upload URL is its
    own credential, and google-genai sends no key with the bytes), the random faults, then `handler`.
    Errors become Google's JSON error; each answer is counted in the stats' batch_api_by_status."""

    async def endpoint(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        epoch = state.epoch
        try:
            version = request.match_info.get("version", "")
            if version not in catalog.API_VERSIONS:
                raise errors.method_not_found(version, request.path)
            if keyed:
                authenticate(request, state.api_keys, state.config.revoked_keys)
                # Refused before any work, so a refused call leaves nothing behind.
                if (fault := random_fault(state)) is not None:
                    raise fault
            response = await handler(request)
        except errors.ApiError as error:
            if state.epoch == epoch:
                state.batch_api_by_error[error.kind] += 1
            response = error.response()
        if state.epoch == epoch:
            state.batch_api_by_status[str(response.status)] += 1
        return response

    return endpoint
