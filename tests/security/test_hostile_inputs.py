"""Inputs that must be refused with a clear 4xx before they reach Redis or cost anything, and a
gateway that will not start with a secret anyone could know."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from deploy.processes import Process, base_env, free_port, python
from deploy.stack import Stack
from services.gateway.auth import ApiKeys
from shared import keys
from shared.lifecycle import EXIT_MISCONFIGURED
from shared.secret_policy import problems
from shared.settings import Settings
from shared.webhook_signing import hkdf_sha256, project_signing_secrets, project_webhook_secret
from tests.security.conftest import KEY_A
from tests.stack_helpers import png_bytes, running_stack, submit, upload

STRONG = {
    "BUNCH_ENV": "production",
    "BUNCH_WEBHOOK_SECRET": "w" * 20 + "Kq8Lz3Vb7Nx2Mc5R",
    "BUNCH_S3_ACCESS_KEY": "bunch-prod-access",
    "BUNCH_S3_SECRET_KEY": "s3-prod-secret-Zr7Wq2Lk9",
    "BUNCH_METRICS_TOKEN": "metrics-token-" + "Hf3Jd8Ls2Qw7Ex9Rt5Yu1Io4",
}
PROD_KEY = "bk-production-key-Xc4Vb8Nm2"


def nested(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


# --- ids are checked before they name a key ---


async def test_ids_with_a_key_suffix_are_unknown_not_a_500(
    api_a: httpx.AsyncClient, api_b: httpx.AsyncClient, api_redis: Redis
) -> None:
    group = (await api_a.post("/api/groups", json={"name": "victims"})).json()["id"]
    dataset = (await api_a.post("/api/datasets", files=[("files", ("a.png", png_bytes(seed=1), "image/png"))])).json()
    job = await submit(api_a, {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 1, "group": group})
    # Every key these would name exists, of another type: before, WRONGTYPE answered 500 to any
    # project, and 404 where the id did not exist: an oracle of other projects' ids.
    assert await api_redis.exists(keys.group_jobs(group), keys.dataset_inputs(dataset["id"])) == 2
    for api in (api_a, api_b):
        for path in (f"/api/groups/{group}:jobs", f"/api/datasets/{dataset['id']}:inputs", f"/api/jobs/{job}:images"):
            response = await api.get(path)
            assert response.status_code == 404, (path, response.text)
        assert (await api.delete(f"/api/groups/{group}:jobs")).status_code == 404
        assert (await api.get(f"/api/downloads/{group}:jobs")).status_code == 404
        refused = await api.post("/api/downloads", json={"group_ids": [f"{group}:jobs"]})
        assert refused.status_code == 422 and "group_ids" in refused.text
        body = {"mode": "automatic", "base_prompt": "x", "dataset_id": f"{dataset['id']}:inputs"}
        assert (await api.post("/api/jobs", json={**body, "variations_per_image": 1})).status_code == 422
        assert (await api.post("/api/queue/cancel", json={"job_ids": ["*"]})).status_code == 422
        assert (await api.post("/api/queue/retry", json={"job_id": f"{job}:images"})).status_code == 422
    assert (await api_a.get(f"/api/groups/{group}")).status_code == 200  # the real ids still work
    assert (await api_a.post(f"/api/jobs/{job}/cancel")).status_code == 200


# --- bodies: depth, and authentication before reading them ---


async def test_deeply_nested_json_is_a_400_on_every_json_route(api_a: httpx.AsyncClient) -> None:
    job = await submit(api_a, {"mode": "semi_auto", "prompts": ["p"], "images_per_prompt": 1})
    routes = [
        ("POST", "/api/jobs"),
        ("PATCH", f"/api/jobs/{job}"),
        ("POST", f"/api/jobs/{job}/redo"),
        ("POST", "/api/groups"),
        ("POST", "/api/downloads"),
        ("POST", "/api/queue/cancel"),
        ("POST", "/api/queue/retry"),
    ]
    for method, path in routes:
        for levels in (100_000, 33):
            headers = {"Content-Type": "application/json"}
            response = await api_a.request(method, path, content=nested(levels), headers=headers)
            assert response.status_code == 400, (method, path, levels, response.text)
            assert "nests deeper than 32 levels" in response.json()["detail"]
    # 32 levels are read as JSON (and then refused by the model as what they are: not a job).
    shallow = await api_a.post("/api/jobs", content=nested(32), headers={"Content-Type": "application/json"})
    assert shallow.status_code == 422
    assert (await api_a.post(f"/api/jobs/{job}/cancel")).status_code == 200


async def test_a_request_without_a_key_is_refused_before_its_body_is_read(api_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=api_stack.gateway_url, timeout=10) as anonymous:
        bad_json = await anonymous.post("/api/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 401 and bad_json.headers["WWW-Authenticate"] == "Bearer"
        huge = await anonymous.post("/api/jobs", content=nested(100_000), headers={"Authorization": "Bearer nope"})
        assert huge.status_code == 401 and huge.json()["detail"] == "Unknown API key."
        upload_attempt = await anonymous.post("/api/uploads", files=[("files", ("a.png", png_bytes(), "image/png"))])
        assert upload_attempt.status_code == 401


def test_api_keys_are_held_and_looked_up_as_digests() -> None:
    table = ApiKeys({KEY_A: "project-a", "another-key-of-20-chars": "project-b"})
    assert table.project(KEY_A) == "project-a"
    assert table.project(KEY_A[:-1]) is None and table.project(KEY_A + "x") is None and table.project("") is None
    # No raw key is kept in memory, so a key cannot be compared (or leaked) character by character.
    assert KEY_A not in repr(vars(table))
    assert all(isinstance(k, bytes) and len(k) == 32 for k in vars(table)["_by_digest"])


# --- secrets ---


def test_published_or_weak_secrets_are_named() -> None:
    unsafe = Settings(
        _env_file=None,
        env="production",
        api_keys="dev-key:dev,short:p2",
        redis_url="redis+sentinel://:replace-me-redis-password@sentinel:26379/bunch/0",
        redis_sentinel_password="short",
    )
    found = "\n".join(problems(unsafe))
    assert "replace-me" not in found  # names settings, never values
    for expected in (
        "BUNCH_REDIS_URL's password is a published default",
        "BUNCH_REDIS_SENTINEL_PASSWORD is shorter than 16 characters",
        "BUNCH_WEBHOOK_SECRET is empty",
        "BUNCH_S3_SECRET_KEY is a published default",
        "BUNCH_S3_ACCESS_KEY is a published default",
        "the key of project 'dev' is a published default",
        "the key of project 'p2' is shorter than 20 characters",
    ):
        assert expected in found, found
    safe = Settings(
        _env_file=None,
        webhook_secret=STRONG["BUNCH_WEBHOOK_SECRET"],
        s3_access_key=STRONG["BUNCH_S3_ACCESS_KEY"],
        s3_secret_key=STRONG["BUNCH_S3_SECRET_KEY"],
        api_keys=f"{PROD_KEY}:prod",
    )
    assert problems(safe) == []


@pytest.mark.parametrize("service", ["gateway", "dispatcher", "packager"])
def test_services_refuse_to_start_with_published_secrets(service: str, tmp_path: Path) -> None:
    env = base_env({"BUNCH_API_KEYS": "dev-key:dev", "BUNCH_REDIS_URL": "redis://127.0.0.1:1/0"})
    args = python("-m", f"services.{service}")
    if service == "gateway":
        args += ["--host", "127.0.0.1", "--port", str(free_port())]
    log = tmp_path / f"{service}.log"
    proc = Process(service, args, env, log).start()
    try:
        status = proc.wait(30)
    finally:
        proc.kill()
    assert status == EXIT_MISCONFIGURED
    text = log.read_text()
    assert "Refusing to start with unsafe secrets" in text and "BUNCH_WEBHOOK_SECRET is empty" in text, text
    assert "Traceback" not in text, text  # one line that says why
    assert "dev-key" not in text.split("Refusing", 1)[1]  # the message names settings, never values


def test_project_signing_keys_come_from_hkdf() -> None:
    # RFC 5869, test case 1.
    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    settings = Settings(_env_file=None, user_webhook_secret="m" * 40)
    a, b = project_webhook_secret(settings, "a"), project_webhook_secret(settings, "b")
    assert a != b and len(a) == 64
    rotating = Settings(_env_file=None, user_webhook_secret="n" * 40, user_webhook_secret_previous="m" * 40)
    assert project_signing_secrets(rotating, "a")[1] == a  # the old secret still signs while rotating
    assert project_signing_secrets(rotating, "a")[0] != a


# --- a production gateway: /metrics behind its own token ---


@pytest.fixture(scope="module")
def production_stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-security-prod-", api_keys=f"{PROD_KEY}:prod", services=("gateway",), service_env=STRONG
    ) as stack:
        yield stack


async def test_metrics_need_their_own_token_in_production(production_stack: Stack) -> None:
    token = STRONG["BUNCH_METRICS_TOKEN"]
    async with httpx.AsyncClient(base_url=production_stack.gateway_url, timeout=10) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"Authorization": f"Bearer {PROD_KEY}"})).status_code == 401
        scraped = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200 and "bunch_" in scraped.text
    # Without a token set, a production gateway does not serve them at all.
    port = free_port()
    production_stack.start_service("gateway", replica=1, extra_env={"BUNCH_METRICS_TOKEN": ""}, port=port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            refused = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 403 and "BUNCH_METRICS_TOKEN" in refused.json()["detail"]
    finally:
        production_stack.processes["gateway-1"].stop()


# --- the console's headers ---


async def test_console_pages_forbid_inline_script_and_framing(api_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=api_stack.gateway_url, timeout=10) as http:
        for path in ("/", "/automatic", "/groups"):
            page = await http.get(path)
            policy = page.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "unsafe-inline" not in policy
            assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy
            assert page.headers["X-Frame-Options"] == "DENY"
            assert page.headers["X-Content-Type-Options"] == "nosniff"
            assert page.headers["Referrer-Policy"] == "no-referrer"
            # Nothing inline for the policy to refuse: no <script> body, no handler or style attribute.
            assert "<script>" not in page.text and " on" + "click=" not in page.text and "style=" not in page.text
        api = await http.get("/api/jobs")
        assert api.headers["X-Frame-Options"] == "DENY" and api.headers["X-Content-Type-Options"] == "nosniff"


async def test_results_of_a_huge_job_come_in_bounded_pages(api_a: httpx.AsyncClient) -> None:
    refs = await upload(api_a, [png_bytes(seed=7)])
    prompts = [f"{n} " + "long prompt " * 330 for n in range(100)]  # 100 prompts of ~4,000 characters
    body = {"mode": "semi_auto", "prompts": prompts, "images_per_prompt": 10, "reference_ids": refs}
    job = await submit(api_a, body)
    started = time.monotonic()
    page = await api_a.get(f"/api/jobs/{job}/results", params={"limit": 200})
    assert page.status_code == 200 and len(page.json()["images"]) == 200
    # 200 images and the 20 prompts they use, each once: not 200 copies of 4,000 characters.
    assert len(page.content) < 150_000, len(page.content)
    assert (await api_a.get(f"/api/jobs/{job}/results", params={"limit": 201})).status_code == 422
    assert time.monotonic() - started < 10
    assert (await api_a.post(f"/api/jobs/{job}/cancel")).status_code == 200
