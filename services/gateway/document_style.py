"""The style of the APIs Bunch's existing front-ends were written against (the queue management
API and the generations plan in docs/compatible_api.md): camelCase names, `"success": true` in
answers and `{"success": false, "error": ...}` for errors, with the same status codes as the rest
of the API.

The rule for a route both styles share (/api/queue/retry, /cancel, /stats, /metrics): a request
that uses a camelCase name, in its query string or as a key of its JSON body (`projectId`,
`jobId`, `retryAll`, `batchIds`, `timeRange`), is in the document style and answered in it;
any other request is in Bunch's own style (snake_case, `{"detail": ...}` errors), as before.
"""

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from services.gateway.errors import error_answer
from services.gateway.idempotency import IdempotentRoute
from services.gateway.schemas.common import document_problems, either_problems
from shared.errors import NotFound

_CAMEL = re.compile(r"[a-z0-9][A-Z]")

# Routes only the document style has: their errors are always in it, the 401 of a missing key too.
DOCUMENT_ONLY_PREFIXES = ("/api/generations/", "/api/queue/enqueue", "/api/queue/status/", "/api/queue/redo")


def is_camel(name: object) -> bool:
    return isinstance(name, str) and _CAMEL.search(name) is not None


def uses_camel_case(data: Any) -> bool:
    """Whether a request body (parsed JSON) names anything in camelCase."""
    return isinstance(data, dict) and any(is_camel(name) for name in data)


def body_style(data: Any) -> str:
    """'document' or 'native': a pydantic discriminator for the bodies of the shared routes."""
    return "document" if uses_camel_case(data) else "native"


async def asks_document_style(request: Request) -> bool:
    if any(is_camel(name) for name in request.query_params):
        return True
    if request.method not in ("POST", "PUT", "PATCH"):
        return False
    try:
        # Starlette keeps the body it read: the route reads the same bytes again.
        return uses_camel_case(json.loads(await request.body()))
    except ValueError:
        return False


def error_body(message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"success": False, "error": message, **(extra or {})}


def unauthenticated_body(path: str, message: str) -> dict[str, Any]:
    """The 401 body of services/gateway/auth.py's middleware, which runs before any body is read:
    document style on the routes only that style has, Bunch's own everywhere else."""
    return error_body(message) if path.startswith(DOCUMENT_ONLY_PREFIXES) else {"detail": message}


def check_project(asked: str | None, project: str) -> None:
    """A `projectId` other than the caller's own project (its API key's) is a 404: another
    project's data is never shown to exist."""
    if asked is not None and asked != project:
        raise NotFound("No such project for this API key.")


class DocumentModel(BaseModel):
    """A body of the document style: camelCase on the wire, snake_case in Python."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class DocumentRoute(IdempotentRoute):
    """A route whose errors are in the document style."""

    error_responses = staticmethod(document_problems)

    async def in_document_style(self, request: Request) -> bool:
        return True

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def styled(request: Request) -> Response:
            if not await self.in_document_style(request):
                return await handler(request)
            try:
                return await handler(request)
            except Exception as exc:
                answer = error_answer(exc)
                if answer is None:
                    raise
                return JSONResponse(error_body(answer.message, answer.extra), answer.status, headers=answer.headers)

        return styled


class EitherStyleRoute(DocumentRoute):
    """A route both styles share: errors in the style the request was asked in."""

    error_responses = staticmethod(either_problems)

    async def in_document_style(self, request: Request) -> bool:
        return await asks_document_style(request)
