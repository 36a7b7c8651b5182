"""Browser access for the front-ends of BUNCH_CORS_ORIGINS: exact origins only, no cookies.

The API key travels in the Authorization header, which no browser sends on its own: credentials
mode stays off, and an origin not listed gets no CORS headers (the browser then refuses to show it
the answer). Server-sent events are read with fetch (the console's way), so they need nothing more.
"""

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from services.gateway.idempotency import IDEMPOTENCY_KEY_HEADER, REPLAYED_HEADER

ALLOWED_METHODS = ("GET", "POST", "PATCH", "DELETE")
ALLOWED_HEADERS = ("Authorization", "Content-Type", IDEMPOTENCY_KEY_HEADER, "Last-Event-ID")
# What a front-end reads of an answer beyond the CORS-safelisted headers: where a created thing
# is, how long to wait before a retry, the key an answer belongs to, and a download's file name.
EXPOSED_HEADERS = ("Location", "Retry-After", IDEMPOTENCY_KEY_HEADER, REPLAYED_HEADER, "Content-Disposition")
PREFLIGHT_MAX_AGE_SECONDS = 600


def add_cors(app: FastAPI, origins: list[str]) -> None:
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=ALLOWED_METHODS,
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        allow_credentials=False,
        max_age=PREFLIGHT_MAX_AGE_SECONDS,
    )
