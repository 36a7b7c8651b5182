"""Every error answer of the gateway: the one place where an error becomes an HTTP status.

Stores and services raise the kinds of shared/errors.py; `add_error_handlers` maps each to its
status, with a `{"detail": ...}` body (and `errors` per field for a 422 of validation). A dependency
that is down (Redis, object storage) is a 503 whatever raised it.
"""

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import urllib3
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minio.error import MinioException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.auth import UNAUTHENTICATED_HEADERS
from shared import errors

# By kind; a subclass not named answers as its nearest named ancestor.
STATUS_BY_KIND: dict[type[errors.BunchError], int] = {
    errors.BunchError: 400,
    errors.Invalid: 422,
    errors.Unreadable: 400,
    errors.TooLarge: 413,
    errors.Unsupported: 415,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.OverQuota: 429,
    errors.OverBudget: 402,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.Unavailable: 503,
    errors.Misconfigured: 500,
}

_PARAM = re.compile(r"\{[^/{}]+\}")
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@cache
def _resources(app: FastAPI) -> list[tuple[re.Pattern[str], int, tuple[str, ...]]]:
    """Each path of the description: its pattern, its number of parameters, its methods."""
    resources = []
    for path, operations in app.openapi().get("paths", {}).items():
        parts = _PARAM.split(path)
        pattern = re.compile("^" + "[^/]+".join(re.escape(part) for part in parts) + "$")
        methods = tuple(sorted(method.upper() for method in operations if method in _METHODS))
        resources.append((pattern, len(parts) - 1, methods))
    return resources


def status_of(error: errors.BunchError) -> int:
    for kind in type(error).__mro__:
        if kind in STATUS_BY_KIND:
            return STATUS_BY_KIND[kind]
    return 400


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error as the API answers it, before it is put in one style or the other: Bunch's own
    (`{"detail": ...}`) or the document style of services/gateway/document_style.py."""

    status: int
    message: str
    extra: dict[str, Any] = field(default_factory=dict)  # figures a client shows beside the message
    headers: dict[str, str] | None = None


def readable(exc: RequestValidationError) -> str:
    messages = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body",))
        messages.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(messages) or "Invalid request."


def error_answer(exc: Exception) -> ErrorAnswer | None:
    """What the API answers for `exc`; None for an exception that is a bug (a 500)."""
    if isinstance(exc, errors.BunchError):
        if isinstance(exc, errors.OverQuota | errors.InProgress):
            return ErrorAnswer(status_of(exc), exc.message, headers={"Retry-After": str(exc.retry_after)})
        if isinstance(exc, errors.Unauthenticated):
            return ErrorAnswer(status_of(exc), exc.message, headers=UNAUTHENTICATED_HEADERS)
        if isinstance(exc, errors.OverBudget):
            return ErrorAnswer(status_of(exc), exc.message, extra=dict(exc.figures))
        return ErrorAnswer(status_of(exc), exc.message)
    if isinstance(exc, RequestValidationError):
        by_field = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        return ErrorAnswer(422, readable(exc), extra={"errors": by_field})
    if isinstance(exc, MinioException | urllib3.exceptions.HTTPError | RedisConnectionError | RedisTimeoutError):
        what = "Object storage" if isinstance(exc, MinioException | urllib3.exceptions.HTTPError) else "Redis"
        return ErrorAnswer(503, f"{what} is unavailable; nothing was changed. Try again shortly.")
    if isinstance(exc, StarletteHTTPException):
        return ErrorAnswer(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}) or None)
    return None


async def _answered(_: Request, exc: Exception) -> JSONResponse:
    answer = error_answer(exc)
    assert answer is not None
    return JSONResponse({"detail": answer.message, **answer.extra}, answer.status, headers=answer.headers)


def add_error_handlers(app: FastAPI) -> None:
    for kind in (errors.BunchError, RequestValidationError, MinioException, urllib3.exceptions.HTTPError):
        app.add_exception_handler(kind, _answered)
    for kind in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(kind, _answered)
    app.add_exception_handler(405, _method_not_allowed)


# The router stops at the first route whose path matches, so on its own it would answer
# `OPTIONS /api/jobs` with `Allow: POST` although `GET /api/jobs` exists too. The methods are read
# from the OpenAPI description, which lists every public route.


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the resource at `path` answers, from the OpenAPI description (empty if none).
    A path without parameters is its own resource, as OpenAPI matches concrete paths before
    templated ones: /api/jobs/quote is not the job "quote" of /api/jobs/{job_id}."""
    matches = [(params, methods) for pattern, params, methods in _resources(app) if pattern.match(path)]
    if not matches:
        return []
    fewest = min(params for params, _ in matches)
    return sorted({method for params, methods in matches if params == fewest for method in methods})


async def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    app = request.app
    methods = allowed_methods(app, request.url.path) if isinstance(app, FastAPI) else []
    if methods:
        headers["Allow"] = ", ".join(methods)
    return JSONResponse({"detail": f"{request.method} is not allowed here."}, 405, headers=headers)
