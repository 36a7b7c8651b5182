"""Presigned links live exactly BUNCH_PRESIGN_EXPIRY_SECONDS (a RunPod worker's: the run's ttl), and
no secret ever leaves the stack: not in a log line of any process, not in any API answer (the whole
real stack, distinctive values)."""

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from minio import Minio

from deploy.stack import Stack
from services.dispatcher.payloads import link_lifetime_seconds
from shared.settings import Settings
from tests.security.conftest import KEY_A, PRESIGN_SECONDS, S3_ACCESS_KEY, S3_SECRET_KEY, SECRETS
from tests.stack_helpers import emulator, png_bytes, submit, upload, wait_final

AMZ_DATE = "%Y%m%dT%H%M%SZ"


class Recorder:
    """Every answer the API gave in a test, to search for secrets."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.answers.append(f"{response.request.method} {response.request.url} -> {response.status_code}\n{headers}\n")
        self.answers[-1] += response.text


def recording_client(stack: Stack, key: str | None, recorder: Recorder) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(
        base_url=stack.gateway_url, headers=headers, timeout=30, event_hooks={"response": [recorder]}
    )


async def finished_job(stack: Stack, api: httpx.AsyncClient, group: str) -> tuple[str, dict[str, Any]]:
    refs = await upload(api, [png_bytes(seed=901), png_bytes(seed=902)])
    job_id = await submit(
        api, {"mode": "semi_auto", "group": group, "prompts": ["links"], "reference_ids": refs, "images_per_prompt": 5}
    )
    final = await wait_final(api, job_id, stack, within=60)
    assert final["status"] == "completed", final
    return job_id, final


def link_problems(url: str, now: float, lifetime: int = PRESIGN_SECONDS) -> list[str]:
    """What is wrong with a presigned link: its lifetime, its signing time, its credential."""
    query = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    problems = []
    if query.get("X-Amz-Expires") != str(lifetime):
        problems.append(f"X-Amz-Expires is {query.get('X-Amz-Expires')}, not {lifetime}")
    signed_at = datetime.strptime(query.get("X-Amz-Date", "19700101T000000Z"), AMZ_DATE).replace(tzinfo=UTC)
    if not now - 600 <= signed_at.timestamp() <= now + 5:
        problems.append(f"signed at {signed_at}, not just now")
    if not query.get("X-Amz-Credential", "").startswith(f"{S3_ACCESS_KEY}/"):
        problems.append("not signed with the configured access key")
    if not re.fullmatch(r"[0-9a-f]{64}", query.get("X-Amz-Signature", "")):
        problems.append("no SigV4 signature")
    if query.get("X-Amz-SignedHeaders") != "host":
        problems.append(f"signed headers {query.get('X-Amz-SignedHeaders')}")
    return problems


def resign(method: str, url: str) -> str:
    """The same link signed again, by the same key for the same instant and lifetime: equal only if
    X-Amz-Expires is covered by the signature (a client cannot stretch a link's life)."""
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    bucket, _, key = parts.path.lstrip("/").partition("/")
    signer = Minio(parts.netloc, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, secure=False, region="us-east-1")
    headers: Any = {k: v for k, v in query.items() if k.startswith("response-")}
    return signer.get_presigned_url(
        method,
        bucket,
        key,
        expires=timedelta(seconds=int(query["X-Amz-Expires"])),
        response_headers=headers or None,
        request_date=datetime.strptime(query["X-Amz-Date"], AMZ_DATE).replace(tzinfo=UTC),
    )


def same_signature(a: str, b: str) -> bool:
    return parse_qs(urlsplit(a).query)["X-Amz-Signature"] == parse_qs(urlsplit(b).query)["X-Amz-Signature"]


async def test_every_presigned_link_expires_after_the_configured_lifetime(full_stack: Stack) -> None:
    recorder = Recorder()
    async with recording_client(full_stack, KEY_A, recorder) as api:
        job_id, final = await finished_job(full_stack, api, "links")
        results = (await api.get(f"/api/jobs/{job_id}/results")).json()
        redirect = await api.get(f"/api/jobs/{job_id}/download")
        group = (await api.get(f"/api/groups/{final['group_id']}")).json()
        download_id = (await api.post("/api/downloads", json={"group_ids": [final["group_id"]]})).json()["id"]
        deadline = time.monotonic() + 30
        while (download := (await api.get(f"/api/downloads/{download_id}")).json())["status"] != "ready":
            assert time.monotonic() < deadline and download["status"] != "failed", download
            await asyncio.sleep(0.2)
    now = time.time()
    links: list[tuple[str, str, int]] = [("GET", final["zip"]["url"], PRESIGN_SECONDS)]
    links += [("GET", results["zip"]["url"], PRESIGN_SECONDS)]
    links += [("GET", image["url"], PRESIGN_SECONDS) for image in results["images"]]
    links += [("GET", redirect.headers["location"], PRESIGN_SECONDS), ("GET", download["url"], PRESIGN_SECONDS)]
    links += [("GET", image["url"], PRESIGN_SECONDS) for image in group["images"]]
    # The links the dispatcher gave the RunPod worker (references to read, outputs to write) live
    # as long as the run may wait in RunPod's queue: its ttl plus the webhook grace.
    grace = float(full_stack.service_env["BUNCH_WEBHOOK_GRACE_SECONDS"])
    worker_lifetime = link_lifetime_seconds(Settings(webhook_grace_seconds=grace))
    for run in await emulator(full_stack, "runpod", "GET", "/_emulator/jobs"):
        if run["input"]["job_id"] == job_id:
            for item in run["input"]["items"]:
                links += [("GET", ref, worker_lifetime) for ref in item["reference_urls"]]
                links += [("PUT", item["output_url"], worker_lifetime)]
    assert len(links) >= 5 + 5 + 4 + 5 + 2
    for method, url, lifetime in links:
        problems = link_problems(url, now, lifetime)
        assert problems == [], (url, problems)
        assert same_signature(url, resign(method, url)), url

    # Whether the S3 server itself refuses an expired link. moto's server does not check
    # X-Amz-Expires (nor signatures: it accepts any credentials), so with moto the test rests on
    # the checks above: the lifetime each link states and signs. MinIO and S3 enforce it.
    endpoint = urlsplit(full_stack.s3_url).netloc
    signer = Minio(endpoint, access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, secure=False, region="us-east-1")
    object_key = urlsplit(final["zip"]["url"]).path.split("/", 2)[2]
    expired = signer.get_presigned_url(
        "GET",
        "bunch",
        object_key,
        expires=timedelta(seconds=PRESIGN_SECONDS),
        request_date=datetime.now(UTC) - timedelta(seconds=PRESIGN_SECONDS + 60),
    )
    async with httpx.AsyncClient() as plain:
        fresh_status = (await plain.get(final["zip"]["url"])).status_code
        expired_status = (await plain.get(expired)).status_code
    assert fresh_status == 200
    enforced = expired_status == 403
    print(f"S3 server enforces link expiry: {enforced} (answered {expired_status} to a link expired 60 s ago)")


async def test_no_secret_appears_in_any_log_or_api_answer(full_stack: Stack) -> None:
    recorder = Recorder()
    async with recording_client(full_stack, KEY_A, recorder) as api:
        job_id, final = await finished_job(full_stack, api, "secrets")
        for path in (
            f"/api/jobs/{job_id}",
            f"/api/jobs/{job_id}/status",
            f"/api/jobs/{job_id}/results",
            f"/api/jobs/{job_id}/download",
            f"/api/groups/{final['group_id']}",
            "/api/groups",
            "/api/jobs",
            "/api/queue/stats",
            "/api/queue/metrics?time_range=all",
            "/api/webhooks/secret",
            "/api/jobs/nope/status",
            "/openapi.json",
            "/healthz",
            "/readyz",
        ):
            await api.get(path)
        async with api.stream("GET", f"/api/jobs/{job_id}/events") as events:
            await events.aread()
        await api.post("/api/jobs", json={"mode": "semi_auto", "prompts": [], "images_per_prompt": 1})
        await api.post("/api/uploads", files=[("files", ("x.png", b"not an image", "image/png"))])
        await api.post("/api/jobs", content=b"{" * 4_000_000, headers={"content-type": "application/json"})
    for key in (None, "Bearer-less", KEY_A[:-1]):
        async with recording_client(full_stack, key, recorder) as other:
            await other.get("/api/queue/stats")
    async with recording_client(full_stack, None, recorder) as anonymous:
        await anonymous.post("/internal/runpod/webhook?token=a~1~9999999999~bad", json={"status": "COMPLETED"})
    assert len(recorder.answers) >= 25
    # The per-project webhook signing secret is handed out by design; it is not the master secret.
    project_secret = next(a for a in recorder.answers if "/api/webhooks/secret" in a.split("\n", 1)[0])
    assert '"secret":"' in project_secret

    logs = {path.name: path.read_text(errors="replace") for path in sorted(full_stack.workdir.glob("*.log"))}
    assert {"gateway-0.log", "dispatcher-0.log", "packager-0.log", "runpod.log", "gemini.log", "s3.log"} <= set(logs)
    assert sum(len(text) for text in logs.values()) > 10_000, "the services logged almost nothing"
    leaks = [
        f"{what} in {where}"
        for what, secret in SECRETS.items()
        for where, text in [*logs.items(), *((answer.split("\n", 1)[0], answer) for answer in recorder.answers)]
        if secret in text
    ]
    assert leaks == [], leaks
