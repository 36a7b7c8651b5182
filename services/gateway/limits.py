"""Request body limits, enforced while the body arrives: no request makes the gateway read more.

JSON routes accept what the largest valid request weighs (every prompt at its longest, written
with JSON escapes, or every input id of the largest job), and no more. Uploads and datasets are
multipart: the parser spools their files to disk and each file is checked on its own, so their
limit is what a full request of them may weigh. The RunPod webhook accepts 1 MiB. Beyond its limit
a request gets 413 with a message, before its body is parsed; a JSON body nested deeper than
shared/bounded_json.py's MAX_DEPTH gets 400, also before it is parsed.
"""

from dataclasses import dataclass, field

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.routes import uploads, webhooks
from shared import bounded_json
from shared.settings import Settings

KIB = 1024
MIB = 1024 * KIB
# Past its limit, a request's body is still read (and dropped) up to this size, so the client gets
# the 413 rather than a connection reset while it is still sending; bigger ones are cut off.
DRAIN_LIMIT = 64 * MIB
PART_OVERHEAD = 4 * KIB  # multipart headers of one file, generously


def _size(limit: int) -> str:
    return f"{limit / MIB:.1f} MiB" if limit >= MIB else f"{limit} bytes"


def too_large_message(limit: int) -> str:
    return (
        f"The request body is larger than {_size(limit)}, the most this route accepts. "
        "Send fewer or smaller items per request."
    )


class BodyTooLarge(HTTPException):
    """Raised from `receive`: FastAPI passes HTTPExceptions from body parsing through unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large_message(limit))


@dataclass(frozen=True)
class BodyLimits:
    default: int
    by_path: dict[str, int] = field(default_factory=dict)

    def for_path(self, path: str) -> int:
        return self.by_path.get(path.rstrip("/") or "/", self.default)


def body_limits(settings: Settings) -> BodyLimits:
    # 6 bytes a character: the worst case of JSON's \uXXXX escapes.
    prompts = settings.max_prompts * settings.max_prompt_chars * 6
    input_ids = settings.max_inputs_per_job * 40  # "<32 hex>", with room for spaces
    json_limit = max(MIB, prompts + input_ids + 64 * KIB)
    entries = max(settings.max_dataset_entries, settings.max_inputs_per_job)
    return BodyLimits(
        default=json_limit,
        by_path={
            "/api/uploads": uploads.MAX_FILES * (settings.max_upload_bytes + PART_OVERHEAD) + MIB,
            "/api/datasets": settings.max_dataset_bytes + entries * PART_OVERHEAD + MIB,
            "/internal/runpod/webhook": webhooks.MAX_BODY,
        },
    )


def _is_json(scope: Scope) -> bool:
    """Whether the body will be parsed as JSON: a JSON media type, or none at all (FastAPI then
    parses it as JSON too)."""
    if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media_type = value.split(b";", 1)[0].strip().lower()
            return media_type == b"application/json" or media_type.endswith(b"+json")
    return True


def _check_depth(body: bytes) -> None:
    # Before any parser recurses: Python's json recurses per level (RecursionError past ~1,000, a
    # 500), and no Bunch body is deeper than a handful of levels.
    if bounded_json.depth(body) > bounded_json.MAX_DEPTH:
        raise HTTPException(400, f"The JSON body nests deeper than {bounded_json.MAX_DEPTH} levels.")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.for_path(scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            if declared <= DRAIN_LIMIT:
                await _drain(receive, DRAIN_LIMIT)
            response = JSONResponse({"detail": too_large_message(limit)}, 413, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        json_chunks: list[bytes] | None = [] if _is_json(scope) else None

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_LIMIT)
                    raise BodyTooLarge(limit)
                if json_chunks is not None:
                    json_chunks.append(chunk)
                    if not message.get("more_body", False):
                        _check_depth(b"".join(json_chunks) if len(json_chunks) > 1 else chunk)
            return message

        await self.app(scope, limited_receive, send)
