"""Every /api route needs a key, and a key of project A never reaches project B's resources.

Both walk the gateway's OpenAPI description, so a route added later is covered (or fails here
until its path parameter has a project-B resource to try).
"""

import json
import re
from typing import Any

import httpx

from deploy.stack import Stack
from services.gateway.document_style import DOCUMENT_ONLY_PREFIXES
from tests.security.conftest import KEY_A
from tests.stack_helpers import png_bytes, submit, upload

# Routes outside /api and how each is guarded.
PUBLIC = {
    ("GET", "/healthz"): "liveness, no data",
    ("GET", "/readyz"): "readiness, no data",
    ("POST", "/internal/runpod/webhook"): "RunPod's callback: the HMAC token in its URL (test_webhooks.py)",
}
# A body each operation accepts, so the answer is about the key and not about the body.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/jobs"): {"mode": "semi_auto", "prompts": ["x"], "images_per_prompt": 1},
    ("PATCH", "/api/jobs/{job_id}"): {"priority": 5},
    ("POST", "/api/jobs/{job_id}/redo"): {"indices": [0]},
    ("POST", "/api/groups"): {"name": "mine"},
    ("POST", "/api/downloads"): {"group_ids": ["x"]},
    ("POST", "/api/queue/cancel"): {"job_ids": []},
    ("POST", "/api/queue/retry"): {"retry_all": True},
}
MULTIPART = {("POST", "/api/uploads"), ("POST", "/api/datasets")}


async def spec_of(stack: Stack) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.gateway_url) as raw:
        return dict((await raw.get("/openapi.json")).json())


def operations(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, methods in spec["paths"].items() for method in methods]


def request_args(method: str, path: str) -> dict[str, Any]:
    if (method, path) in MULTIPART:
        return {"files": [("files", ("a.png", png_bytes(seed=1), "image/png"))]}
    if (method, path) in BODIES:
        return {"json": BODIES[(method, path)]}
    return {}


async def test_every_api_route_requires_a_valid_key(api_stack: Stack) -> None:
    spec = await spec_of(api_stack)
    ops = operations(spec)
    outside = {op for op in ops if not op[1].startswith("/api/")}
    assert outside == set(PUBLIC), f"routes outside /api need a decision here: {outside ^ set(PUBLIC)}"
    walked = 0
    async with httpx.AsyncClient(base_url=api_stack.gateway_url, timeout=30) as anonymous:
        for method, path in ops:
            if not path.startswith("/api/"):
                continue
            assert spec["paths"][path][method.lower()].get("security"), f"{method} {path} declares no security"
            url = re.sub(r"\{\w+\}", "0" * 32, path)
            for headers in (
                {},
                {"Authorization": "Bearer not-a-key"},
                {"Authorization": f"Basic {KEY_A}"},  # a real key, in the wrong scheme
                {"Authorization": KEY_A},
                {"X-API-Key": KEY_A},
            ):
                response = await anonymous.request(method, url, headers=headers, **request_args(method, path))
                assert response.status_code == 401, (method, path, headers, response.status_code, response.text)
                body = response.json()
                # The routes only the document style has answer in it (services/gateway/document_style.py).
                assert "API key" in (body["error"] if path.startswith(DOCUMENT_ONLY_PREFIXES) else body["detail"])
                assert response.headers["www-authenticate"] == "Bearer"
            walked += 1
    assert walked >= 25


async def first_event(api: httpx.AsyncClient, path: str) -> dict[str, Any]:
    async with api.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return dict(json.loads(line[6:]))
    raise AssertionError(f"no event from {path}")


async def test_project_a_gets_404_for_every_resource_of_project_b(
    api_stack: Stack, api_a: httpx.AsyncClient, api_b: httpx.AsyncClient
) -> None:
    # Real resources of project B, one for each kind of path parameter.
    refs_b = await upload(api_b, [png_bytes(seed=501)])
    body = {"mode": "semi_auto", "group": "b-only", "prompts": ["b"], "reference_ids": refs_b, "images_per_prompt": 4}
    job_b = await submit(api_b, body)
    group_b = (await api_b.get(f"/api/jobs/{job_b}/status")).json()["group_id"]
    files = [("files", (f"d{n}.png", png_bytes(seed=600 + n), "image/png")) for n in range(2)]
    dataset = await api_b.post("/api/datasets", files=files)
    assert dataset.status_code == 201, dataset.text
    download = await api_b.post("/api/downloads", json={"group_ids": [group_b]})
    assert download.status_code == 202, download.text
    ids = {"job_id": job_b, "group_id": group_b, "dataset_id": dataset.json()["id"]}
    ids["download_id"] = download.json()["id"]
    batch = await api_b.post("/api/batches", json=body)
    assert batch.status_code == 201, batch.text
    ids["batch_id"] = batch.json()["id"]
    export = await api_b.post("/api/exports", json={"destination": "b-bucket", "group_ids": [group_b]})
    assert export.status_code == 202, export.text
    ids["export_id"] = export.json()["id"]

    walked = []
    for method, path in operations(await spec_of(api_stack)):
        params = set(re.findall(r"\{(\w+)\}", path))
        if not params:
            continue
        assert params <= ids.keys(), f"{method} {path}: no project-B resource for {params - ids.keys()}"
        response = await api_a.request(method, path.format(**ids), **request_args(method, path))
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        answer = response.json()
        message = answer["error"] if path.startswith(DOCUMENT_ONLY_PREFIXES) else answer["detail"]
        assert message.startswith("No such"), (method, path, response.text)
        walked.append(f"{method} {path}")
    assert len(walked) >= 13, walked
    # The document style names resources in its bodies: project B's batch is not found either.
    enqueue = {"batchId": ids["batch_id"], "projectId": "project-a"}
    response = await api_a.post("/api/queue/enqueue", json=enqueue)
    assert response.status_code == 404 and response.json()["error"] == "No such batch in this project."
    print("walked:", ", ".join(walked))

    # Ids of project B inside request bodies are no way in either.
    unknown_upload = await api_a.post(
        "/api/jobs", json={"mode": "semi_auto", "prompts": ["x"], "reference_ids": refs_b, "images_per_prompt": 1}
    )
    assert unknown_upload.status_code == 422 and "Unknown upload ids" in unknown_upload.json()["detail"]
    # With some of the caller's own uploads among them, only the others are named.
    refs_a = await upload(api_a, [png_bytes(seed=502), png_bytes(seed=503)])
    mixed = await api_a.post(
        "/api/jobs",
        json={"mode": "semi_auto", "prompts": ["x"], "reference_ids": [*refs_a, *refs_b], "images_per_prompt": 1},
    )
    assert mixed.status_code == 422 and mixed.json()["detail"].startswith(f"Unknown upload ids: {refs_b[0]}.")
    unknown_dataset = await api_a.post(
        "/api/jobs", json={"mode": "automatic", "base_prompt": "x", "dataset_id": ids["dataset_id"]}
    )
    assert unknown_dataset.status_code == 422 and "Unknown dataset_id" in unknown_dataset.json()["detail"]
    other_group = await api_a.post("/api/downloads", json={"group_ids": [group_b]})
    assert other_group.status_code == 404
    other_destination = await api_a.post("/api/exports", json={"destination": "b-bucket", "group_ids": [group_b]})
    assert other_destination.status_code == 404 and "b-bucket" in other_destination.json()["detail"]
    canceled = await api_a.post("/api/queue/cancel", json={"job_ids": [job_b]})
    assert canceled.status_code == 200 and canceled.json()["canceled_count"] == 0
    retried = await api_a.post("/api/queue/retry", json={"job_id": job_b})
    assert retried.status_code == 404
    # Naming B's group id as a group makes a group of A's own with that name.
    own = await submit(api_a, {"mode": "semi_auto", "group": group_b, "prompts": ["a"], "images_per_prompt": 1})
    assert (await api_a.get(f"/api/jobs/{own}/status")).json()["group_id"] != group_b
    listed = (await api_a.get("/api/jobs", params={"limit": 200})).json()["jobs"]
    assert job_b not in {job["id"] for job in listed}
    assert group_b not in {group["id"] for group in (await api_a.get("/api/groups")).json()["groups"]}
    snapshot = await first_event(api_a, "/api/events")
    assert snapshot["project"] == "project-a" and job_b not in {job["job_id"] for job in snapshot["jobs"]}

    # Project B still has every resource, unchanged by what A tried.
    status = (await api_b.get(f"/api/jobs/{job_b}/status")).json()
    assert (status["status"], status["priority"]) == ("queued", 10)
    group = await api_b.get(f"/api/groups/{group_b}")
    assert group.status_code == 200 and group.json()["job_count"] == 1
    assert (await api_b.get(f"/api/datasets/{ids['dataset_id']}")).status_code == 200
    assert (await api_b.get(f"/api/downloads/{ids['download_id']}")).status_code == 200
    assert (await first_event(api_b, f"/api/jobs/{job_b}/events"))["job_id"] == job_b
