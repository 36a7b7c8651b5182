"""ASGI factories for the gateway benchmark, served by uvicorn or granian with `--factory`.

- `bunch_app`: the real gateway (services.gateway.app.create_app), logging set up as its __main__ does;
  the closed loop serves it. The open loop runs the gateway as deployed, `python -m services.gateway`.
- `bare_app`: the floor: FastAPI with one Redis write (POST) or one Redis read (GET) per request;
  both loops compare the gateway with it.
"""

import json
import os
import uuid
from typing import Any

from fastapi import Body, FastAPI
from redis.asyncio import Redis


def bunch_app() -> FastAPI:
    # Imported here, so the bare app's process holds none of the gateway's modules (memory, import
    # time) and still starts while the gateway's code is being changed.
    from services.gateway.app import create_app
    from shared import logs

    logs.configure("gateway")
    return create_app()


def bare_app() -> FastAPI:
    redis = Redis.from_url(os.environ["BUNCH_REDIS_URL"], decode_responses=True)
    app = FastAPI()

    @app.post("/bare/jobs", status_code=202)
    async def write(body: dict[str, Any] = Body()) -> dict[str, str]:  # noqa: B008
        job_id = uuid.uuid4().hex
        await redis.set(f"bench:bare:{job_id}", json.dumps(body))
        return {"id": job_id, "status": "queued"}

    @app.get("/bare/jobs/{job_id}")
    async def read(job_id: str) -> dict[str, Any]:
        value = await redis.get(f"bench:bare:{job_id}")
        return {"id": job_id, "found": value is not None}

    return app
