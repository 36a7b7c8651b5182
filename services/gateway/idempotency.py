"""Idempotency-Key: a request sent again (its answer lost on the network) creates nothing twice.

A route whose endpoint is marked `@idempotent` and whose router uses `IdempotentRoute` (or a
subclass) honours the header, as Stripe's API and the IETF draft
(draft-ietf-httpapi-idempotency-key-header) describe it. Within the project of the API key:

- the first request with a key claims it and runs; its answer, when a success, is kept for
  BUNCH_IDEMPOTENCY_TTL_SECONDS (24 h) and sent again, status, body and Location, to every repeat
  (with `Idempotent-Replayed: true`), which creates nothing;
- a repeat arriving while the first still runs waits for its answer (BUNCH_IDEMPOTENCY_WAIT_SECONDS),
  then gets 409 with Retry-After;
- the same key with a different request (method, path, query or body) is a 422;
- an error answer creates nothing and is not kept: the key is freed, and the client may send the
  request again (after a 429 or 402, say) with the same key.

One Redis script makes the decision between concurrent repeats (shared/stores/idempotency.py).
"""

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.routing import APIRoute

from services.gateway.auth import PROJECT_SCOPE_KEY
from services.gateway.request_fingerprint import ReadRequest
from services.gateway.schemas.common import problems
from shared.errors import InProgress, Invalid, Unreadable
from shared.stores.idempotency import Claimed, IdempotencyStore, KeptAnswer, KeyBusy, KeyReused

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
# Visible ASCII, as Stripe takes it; the draft's quoted form ("…") is read without its quotes.
_KEY = re.compile(rf"[!-~]{{1,{MAX_KEY_CHARS}}}")
KEPT_HEADERS = ("content-type", "location")
# A creating route answers with an id or a short list: an answer larger than this is sent but not
# kept (logged), so a runaway answer never fills Redis.
MAX_KEPT_BODY_BYTES = 1024 * 1024
RETRY_AFTER_SECONDS = 1
_POLL_FIRST_SECONDS = 0.01
_POLL_MAX_SECONDS = 0.25

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_MARK = "bunch_idempotent"

KEY_PARAMETER: dict[str, Any] = {
    "name": IDEMPOTENCY_KEY_HEADER,
    "in": "header",
    "required": False,
    "description": (
        "Any unique string (a UUID) naming this request. Sent again with the same request within 24 h, "
        "it gets the first answer again and creates nothing; with a different request, a 422."
    ),
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS, "pattern": "^[!-~]+$"},
    "example": "4f8e3c1a-6a0e-4d5b-9a57-2f1d0c3b7e21",
}
IN_PROGRESS_ALONE = "The first request with this Idempotency-Key is still running (see Retry-After)"
MALFORMED_KEY = "A malformed Idempotency-Key header"
IN_PROGRESS = "the first request with this Idempotency-Key is still running (see Retry-After)"


def idempotent(endpoint: Endpoint) -> Endpoint:
    """Marks a creating endpoint: its route honours Idempotency-Key (put it under `@router.post`)."""
    setattr(endpoint, _MARK, True)
    return endpoint


def is_idempotent(endpoint: Callable[..., Any]) -> bool:
    return getattr(endpoint, _MARK, False) is True


def parse_key(value: str) -> str:
    key = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if not _KEY.fullmatch(key):
        raise Unreadable(
            f"The {IDEMPOTENCY_KEY_HEADER} header must be 1 to {MAX_KEY_CHARS} visible ASCII characters (a UUID, say)."
        )
    return key


async def _claim(
    store: IdempotencyStore, project: str, key: str, fingerprint: str, wait: float
) -> Claimed | KeptAnswer:
    deadline = time.monotonic() + wait
    delay = _POLL_FIRST_SECONDS
    while True:
        claim = await store.claim(project, key, fingerprint)
        if isinstance(claim, Claimed | KeptAnswer):
            return claim
        if isinstance(claim, KeyReused):
            raise Invalid(
                f"This {IDEMPOTENCY_KEY_HEADER} was first used for a different request (method, path or body); "
                "a new request needs a new key."
            )
        assert isinstance(claim, KeyBusy)
        if time.monotonic() + delay > deadline:
            raise InProgress(
                f"The first request with this {IDEMPOTENCY_KEY_HEADER} is still running; "
                "send it again shortly for its answer.",
                retry_after=RETRY_AFTER_SECONDS,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, _POLL_MAX_SECONDS)


def _keepable(response: Response) -> KeptAnswer | None:
    body = getattr(response, "body", None)  # a StreamingResponse has none
    if not 200 <= response.status_code < 300 or not isinstance(body, bytes):
        return None
    if response.media_type != "application/json" or len(body) > MAX_KEPT_BODY_BYTES:
        return None
    headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
    return KeptAnswer(response.status_code, headers, body)


def _replayed(answer: KeptAnswer, key: str) -> Response:
    headers = {**answer.headers, IDEMPOTENCY_KEY_HEADER: key, REPLAYED_HEADER: "true"}
    return Response(answer.body, answer.status, headers=headers)


async def _settle(store: IdempotencyStore, claim: Claimed, answer: KeptAnswer | None) -> None:
    # Shielded: a request cancelled mid-way (its client gone) still frees or answers its key.
    with anyio.CancelScope(shield=True):
        if answer is None:
            await store.release(claim)
        elif not await store.answer(claim, answer):
            log.warning("an answer outlived its Idempotency-Key's claim (BUNCH_IDEMPOTENCY_LOCK_SECONDS): not kept")


def honour_idempotency_key(
    handler: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Callable[[Request], Coroutine[Any, Any, Response]]:
    async def idempotent_handler(request: Request) -> Response:
        header = request.headers.get(IDEMPOTENCY_KEY_HEADER)
        if header is None:
            return await handler(request)
        key = parse_key(header)
        project: str = request.scope[PROJECT_SCOPE_KEY]  # every creating route is under /api/
        services = request.app.state.services
        read = await ReadRequest.read(request)
        try:
            claim = await _claim(
                services.idempotency, project, key, read.fingerprint, services.settings.idempotency_wait_seconds
            )
            if isinstance(claim, KeptAnswer):
                return _replayed(claim, key)
            try:
                response = await handler(Request(request.scope, read.receive))
            except BaseException:
                await _settle(services.idempotency, claim, None)
                raise
            kept = _keepable(response)
            if kept is None and response.status_code < 300:
                log.warning("%s answered %d unkept by its Idempotency-Key", request.url.path, response.status_code)
            await _settle(services.idempotency, claim, kept)
            response.headers[IDEMPOTENCY_KEY_HEADER] = key
            return response
        finally:
            read.close()

    return idempotent_handler


class IdempotentRoute(APIRoute):
    """A route class for the routers with creating endpoints: the endpoints marked `@idempotent`
    honour Idempotency-Key, and their description says so; the others are plain routes."""

    error_responses = staticmethod(problems)  # the style of the route's error answers

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if is_idempotent(endpoint):
            extra = dict(kwargs.get("openapi_extra") or {})
            extra["parameters"] = [*extra.get("parameters", ()), KEY_PARAMETER]
            kwargs["openapi_extra"] = extra
            responses = dict(kwargs.get("responses") or {})
            if 409 in responses:
                described = responses[409].get("description", "Conflicts with the current state")
                responses[409] = {**responses[409], "description": f"{described}, or {IN_PROGRESS}"}
            else:
                responses[409] = {
                    **self.error_responses(409)[409],
                    "description": IN_PROGRESS[0].upper() + IN_PROGRESS[1:],
                }
            responses.setdefault(400, {**self.error_responses(400)[400], "description": MALFORMED_KEY})
            kwargs["responses"] = responses
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        return honour_idempotency_key(handler) if is_idempotent(self.endpoint) else handler
