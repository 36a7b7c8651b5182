"""405 answers whose `Allow` header lists every method of the resource.

The router stops at the first route whose path matches, so on its own it would answer
`OPTIONS /api/jobs` with `Allow: POST` although `GET /api/jobs` exists too. The methods are read
from the OpenAPI description, which lists every public route.
"""

import re
from functools import cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_PARAM = re.compile(r"\{[^/{}]+\}")
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@cache
def _resources(app: FastAPI) -> list[tuple[re.Pattern[str], tuple[str, ...]]]:
    resources = []
    for path, operations in app.openapi().get("paths", {}).items():
        pattern = re.compile("^" + "[^/]+".join(re.escape(part) for part in _PARAM.split(path)) + "$")
        methods = tuple(sorted(method.upper() for method in operations if method in _METHODS))
        resources.append((pattern, methods))
    return resources


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the resource at `path` answers, from the OpenAPI description (empty if none)."""
    found: set[str] = set()
    for pattern, methods in _resources(app):
        if pattern.match(path):
            found.update(methods)
    return sorted(found)


async def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    app = request.app
    methods = allowed_methods(app, request.url.path) if isinstance(app, FastAPI) else []
    if methods:
        headers["Allow"] = ", ".join(methods)
    return JSONResponse({"detail": f"{request.method} is not allowed here."}, 405, headers=headers)
