"""API keys: every /api request is authenticated before its body is read.

The key is looked up by its SHA-256 digest: the time an answer takes depends on the digest of
what was sent, never on how much of a real key it matched (a dict lookup of the raw key would
compare it byte by byte), and the table in memory holds digests, not keys. The project found is
put in the request's scope for the routes (services/gateway/deps.py reads it).
"""

import hashlib
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

PROJECT_SCOPE_KEY = "bunch.project"
UNAUTHENTICATED_HEADERS = {"WWW-Authenticate": "Bearer"}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, project_for_key: dict[str, str]) -> None:
        self._by_digest = {_digest(key): project for key, project in project_for_key.items()}

    def project(self, presented: str) -> str | None:
        return self._by_digest.get(_digest(presented))


def bearer_token(authorization: str) -> str | None:
    scheme, _, credentials = authorization.strip().partition(" ")
    return credentials.strip() or None if scheme.lower() == "bearer" else None


def authenticate(keys: ApiKeys, authorization: str) -> tuple[str | None, str]:
    """(project, "") or (None, why not)."""
    credentials = bearer_token(authorization)
    if credentials is None:
        return None, "Missing API key: send it as 'Authorization: Bearer <key>'."
    project = keys.project(credentials)
    return (project, "") if project is not None else (None, "Unknown API key.")


class ApiKeyMiddleware:
    """401 for an /api request without a known key, before anything reads its body."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        body_for: Callable[[str, str], dict[str, Any]],
        prefix: str = "/api/",
    ) -> None:
        self.app = app
        self.keys = keys
        self.body_for = body_for  # (path, message) -> the 401's body, in the style of the path
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        authorization = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        project, problem = authenticate(self.keys, authorization)
        if project is None:
            body = self.body_for(scope["path"], problem)
            response = JSONResponse(body, 401, headers=UNAUTHENTICATED_HEADERS)
            await response(scope, receive, send)
            return
        scope[PROJECT_SCOPE_KEY] = project
        await self.app(scope, receive, send)
