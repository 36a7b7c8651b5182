"""BUNCH_CORS_ORIGINS on the real gateway app (in process, real Redis and moto's S3): exact origins
only, preflights answered before the API key is asked for, and the headers a front-end reads
exposed on every answer, errors included. (A real browser from a second origin: test_cross_origin.py.)"""

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from services.gateway.app import create_app
from shared.settings import Settings

FRONT_END = "https://studio.example.com"


@pytest.fixture
async def api(fresh_redis: Redis, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    url = settings.redis_url.rsplit("/", 1)[0] + "/9"
    app = create_app(
        settings.model_copy(update={"redis_url": url, "cors_origins": f"{FRONT_END},http://localhost:3000"})
    )
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client


@pytest.mark.parametrize("origins", ["*", "https://*.example.com", "studio.example.com", "https://a.example/app"])
def test_only_exact_origins_are_accepted(origins: str) -> None:
    with pytest.raises(ValidationError, match="exact origin"):
        Settings(cors_origins=origins)


async def test_a_preflight_of_a_listed_origin_is_answered_without_a_key(api: httpx.AsyncClient) -> None:
    preflight = await api.options(
        "/api/jobs",
        headers={
            "Origin": FRONT_END,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == FRONT_END
    allowed = {name.strip().lower() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in preflight.headers


async def test_an_origin_not_listed_gets_no_cors_headers(api: httpx.AsyncClient) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = await api.options("/api/jobs", headers=headers)
    assert preflight.status_code == 400 and "Access-Control-Allow-Origin" not in preflight.headers
    answer = await api.get(
        "/api/jobs", headers={"Origin": "https://evil.example", "Authorization": "Bearer test-key-a"}
    )
    assert answer.status_code == 200 and "Access-Control-Allow-Origin" not in answer.headers


async def test_answers_errors_included_expose_what_a_front_end_reads(api: httpx.AsyncClient) -> None:
    unauthenticated = await api.get("/api/jobs", headers={"Origin": FRONT_END})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["Access-Control-Allow-Origin"] == FRONT_END
    exposed = {name.strip() for name in unauthenticated.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Retry-After", "Idempotency-Key", "Idempotent-Replayed"} <= exposed
    headers = {"Origin": FRONT_END, "Authorization": "Bearer test-key-a", "Idempotency-Key": "g-1"}
    created = await api.post("/api/groups", json={"name": "from-the-browser"}, headers=headers)
    assert created.status_code == 201 and created.headers["Access-Control-Allow-Origin"] == FRONT_END
    assert created.headers["Idempotency-Key"] == "g-1"
