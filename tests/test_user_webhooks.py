"""User webhooks: which URLs are refused, and the notifier's signed, retried deliveries to a real
HTTP receiver (an aiohttp server started here), against the real Redis and S3 servers."""

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from redis.asyncio import Redis

from deploy.processes import free_port
from deploy.stack import Stack
from services.packager.notifier import Notifier, PublicOnlyResolver, run_notifier
from shared import keys
from shared.models import JobStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.webhook_safety import webhook_url_problem
from shared.webhook_signing import project_webhook_secret, signature_header
from tests.stack_helpers import client, running_stack, submit, wait_final

PROJECT = "hooks-project"

# --- which URLs may receive webhooks ---


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://10.0.0.1/hook", "private"),
        ("http://192.168.1.20:8080/", "private"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),  # IPv4-mapped IPv6
        ("http://[fd00::1]/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://0.0.0.0:9000/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://localhost:8000/hook", "resolves to a loopback"),
        ("http://127.1/", "resolves to a loopback"),  # odd IPv4 spellings are resolved, then checked
        ("ftp://x/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http:///no-host", "no host"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_webhook_urls_that_are_refused(url: str, words: str) -> None:
    problem = webhook_url_problem(url, allow_private=False)
    assert problem is not None and words in problem, problem


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/hook", "https://93.184.216.34:8443/x?y=1", "https://[2606:4700::1111]/"]
)
def test_public_addresses_are_fine(url: str) -> None:
    assert webhook_url_problem(url, allow_private=False) is None


def test_allow_private_lets_private_hosts_through_but_not_other_schemes() -> None:
    for url in (
        "http://127.0.0.1:9/x",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://localhost/",
        "http://169.254.169.254/",
    ):
        assert webhook_url_problem(url, allow_private=True) is None, url
    assert webhook_url_problem("ftp://x", allow_private=True) is not None
    assert webhook_url_problem("http://", allow_private=True) is not None


async def test_the_delivery_resolver_refuses_names_that_lead_to_private_addresses() -> None:
    # What aiohttp connects to is resolved again at send time: a name whose DNS answer turned
    # private after the URL was checked (DNS rebinding) is refused there too.
    resolver = PublicOnlyResolver()
    try:
        with pytest.raises(OSError, match="loopback"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


# --- signatures ---


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """A receiver's check, as the notifier's docstring describes it: `header` signs exactly `body`
    with `secret` (any of its v1, for rotation) and its timestamp is within tolerance_s of now."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures or abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def test_signatures_verify_only_the_exact_body_with_the_right_secret_while_fresh() -> None:
    body = b'{"event":"job.finished"}'
    now = int(time.time())
    header = signature_header("s3cret", body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify_signature("s3cret", body, header)
    assert not verify_signature("other", body, header)
    assert not verify_signature("s3cret", body + b" ", header)
    assert not verify_signature("s3cret", body, signature_header("s3cret", body, now - 301))
    assert verify_signature("s3cret", body, signature_header("s3cret", body, now - 200))
    assert verify_signature("s3cret", body, f"t={now},v1=deadbeef,{header.split(',')[1]}")  # rotation
    assert not verify_signature("s3cret", body, "garbage")
    assert not verify_signature("s3cret", body, f"t={now}")


def test_project_secrets_differ_from_each_other_and_from_the_runpod_secret() -> None:
    settings = Settings(webhook_secret="master")
    a, b = project_webhook_secret(settings, "a"), project_webhook_secret(settings, "b")
    assert a != b and "master" not in (a, b) and len(a) == 64
    assert project_webhook_secret(Settings(webhook_secret="master", user_webhook_secret="other"), "a") != a


# --- the notifier against a real receiver ---


@dataclass
class Receiver:
    """Answers with `statuses` in turn (the last one repeats) and records every request."""

    statuses: list[int]
    url: str = ""
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return web.Response(status=status, text="ok" if status < 300 else "nope")


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[list[int]], Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def start(statuses: list[int]) -> Receiver:
        receiver = Receiver(statuses)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        receiver.url = f"http://127.0.0.1:{port}/hook"
        return receiver

    yield start
    for runner in runners:
        await runner.cleanup()


def hook_settings(settings: Settings, **changes: object) -> Settings:
    base = {"allow_private_webhooks": True, "user_webhook_attempts": 3, "user_webhook_backoff_seconds": 0.05}
    return settings.model_copy(update={**base, **changes})


async def finished_job(redis: Redis, settings: Settings, url: str, status: JobStatus = JobStatus.COMPLETED) -> str:
    store = JobStore(redis, settings)
    config = SemiAutoJobRequest(mode="semi_auto", prompts=["a fox"], images_per_prompt=4, webhook_url=url)
    job = await store.create(PROJECT, config)
    await redis.hset(keys.job(job.id), "webhook_url", url)  # whatever the job store already keeps
    extra = {"zip_key": keys.zip_object(job.id), "zip_bytes": 1234} if status == JobStatus.COMPLETED else {}
    error = None if status == JobStatus.COMPLETED else "no image succeeded: 4 safety_blocked"
    # As its last run leaves it (its runs are not what these tests are about), then the packager's step.
    await redis.hset(keys.job(job.id), "status", JobStatus.PACKAGING.value)
    assert await store.transition(job.id, JobStatus.PACKAGING, status, error=error, **extra)
    return job.id


async def test_delivery_is_signed_and_carries_the_finished_job(
    redis: Redis, settings: Settings, storage: Storage, receivers: Callable[[list[int]], Awaitable[Receiver]]
) -> None:
    receiver = await receivers([200])
    config = hook_settings(settings)
    job_id = await finished_job(redis, config, receiver.url)
    notifier = Notifier(redis, config, storage)
    try:
        await notifier({"job_id": job_id})
        assert len(receiver.requests) == 1
        headers, body = receiver.requests[0]
        secret = project_webhook_secret(config, PROJECT)
        assert verify_signature(secret, body, headers["Bunch-Signature"])
        assert not verify_signature(config.webhook_secret.get_secret_value(), body, headers["Bunch-Signature"])
        assert not verify_signature(secret, body.replace(b"completed", b"failed"), headers["Bunch-Signature"])
        payload = json.loads(body)
        assert payload["event"] == "job.finished" and headers["Bunch-Delivery"] == payload["id"]
        job = payload["job"]
        assert job["id"] == job_id and job["status"] == "completed" and job["error"] is None
        assert job["progress"] == {
            "images_total": 4,
            "images_succeeded": 0,
            "images_failed": 0,
            "runs_total": 1,
            "runs_done": 0,
        }
        assert job["zip"]["ready"] and job["zip"]["bytes"] == 1234
        assert keys.zip_object(job_id) in job["zip"]["url"] and "X-Amz-Signature" in job["zip"]["url"]
        assert job["links"]["status"].endswith(f"/api/jobs/{job_id}/status")
        record = await redis.hmget(keys.job(job_id), "webhook_status", "webhook_error", "webhook_attempts")
        assert record == ["delivered", "", "1"]

        # A redelivered stream message does not call the receiver again.
        await notifier({"job_id": job_id})
        assert len(receiver.requests) == 1
    finally:
        await notifier.aclose()


async def test_server_errors_are_retried_until_delivered(
    redis: Redis, settings: Settings, storage: Storage, receivers: Callable[[list[int]], Awaitable[Receiver]]
) -> None:
    receiver = await receivers([500, 500, 200])
    config = hook_settings(settings)
    job_id = await finished_job(redis, config, receiver.url, JobStatus.FAILED)
    notifier = Notifier(redis, config, storage)
    try:
        outcome = await notifier.notify(job_id)
    finally:
        await notifier.aclose()
    assert outcome is not None and (outcome.status, outcome.attempts) == ("delivered", 3)
    assert len(receiver.requests) == 3
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1  # the same delivery each time, each freshly signed
    secret = project_webhook_secret(config, PROJECT)
    assert all(verify_signature(secret, body, headers["Bunch-Signature"]) for headers, body in receiver.requests)
    payload = json.loads(bodies.pop())
    assert payload["job"]["status"] == "failed" and payload["job"]["error"].startswith("no image succeeded")
    assert payload["job"]["zip"] == {"ready": False, "bytes": None, "url": None, "url_expires_at": None}
    assert await redis.hget(keys.job(job_id), "webhook_status") == "delivered"


async def test_a_receiver_that_keeps_failing_ends_failed_without_raising(
    redis: Redis, settings: Settings, storage: Storage, receivers: Callable[[list[int]], Awaitable[Receiver]]
) -> None:
    always_503 = await receivers([503])
    rejecting = await receivers([400])
    config = hook_settings(settings)
    unreachable = f"http://127.0.0.1:{free_port()}/hook"
    notifier = Notifier(redis, config, storage)
    try:
        failing_job = await finished_job(redis, config, always_503.url)
        await notifier({"job_id": failing_job})  # the stream handler: must not raise
        assert len(always_503.requests) == 3
        status, error = await redis.hmget(keys.job(failing_job), "webhook_status", "webhook_error")
        assert status == "failed" and "503" in error and "3 attempts" in error

        rejected_job = await finished_job(redis, config, rejecting.url)
        await notifier({"job_id": rejected_job})
        assert len(rejecting.requests) == 1  # a 4xx other than 429 is not retried
        assert await redis.hget(keys.job(rejected_job), "webhook_error") == "the receiver answered HTTP 400"

        gone_job = await finished_job(redis, config, unreachable)
        await notifier({"job_id": gone_job})
        status, error = await redis.hmget(keys.job(gone_job), "webhook_status", "webhook_error")
        assert status == "failed" and "could not reach the receiver" in error
    finally:
        await notifier.aclose()


async def test_private_addresses_are_refused_again_at_send_time(
    redis: Redis, settings: Settings, storage: Storage, receivers: Callable[[list[int]], Awaitable[Receiver]]
) -> None:
    receiver = await receivers([200])
    strict = hook_settings(settings, allow_private_webhooks=False)
    job_id = await finished_job(redis, strict, receiver.url)
    notifier = Notifier(redis, strict, storage)
    try:
        outcome = await notifier.notify(job_id)
    finally:
        await notifier.aclose()
    assert outcome is not None and outcome.status == "failed" and outcome.attempts == 0
    assert receiver.requests == []
    status, error = await redis.hmget(keys.job(job_id), "webhook_status", "webhook_error")
    assert status == "failed" and "loopback" in error


# --- end to end: gateway -> dispatcher -> packager -> notifications stream -> notifier -> receiver ---


@pytest.fixture(scope="module")
def hook_stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-hooks-",
        api_keys=f"hook-key:{PROJECT}",
        runpod_workers=4,
        service_env={
            "BUNCH_ALLOW_PRIVATE_WEBHOOKS": "1",
            "BUNCH_USER_WEBHOOK_BACKOFF_SECONDS": "0.1",
            "BUNCH_WEBHOOK_GRACE_SECONDS": "3",
            "BUNCH_POLL_INTERVAL_SECONDS": "0.5",
        },
    ) as stack:
        yield stack


async def test_a_finished_job_calls_its_webhook_end_to_end(
    hook_stack: Stack, receivers: Callable[[list[int]], Awaitable[Receiver]]
) -> None:
    receiver = await receivers([502, 200])
    # The stack's own settings, as the packager process reads them from its environment.
    settings = Settings(
        redis_url=hook_stack.redis_url,
        s3_endpoint=hook_stack.s3_url,
        public_url=hook_stack.gateway_url,
        webhook_secret=hook_stack.service_env["BUNCH_WEBHOOK_SECRET"],
        allow_private_webhooks=True,
        user_webhook_backoff_seconds=0.1,
        consumer_name="test-notifier",
    )
    redis = Redis.from_url(hook_stack.redis_url, decode_responses=True)
    stop = asyncio.Event()
    # In this process in case the packager does not run a notifier yet; if it does, the consumer
    # group gives each notification to one of them, and the receiver must still see one delivery.
    notifier = asyncio.create_task(run_notifier(redis, settings, Storage(settings), stop, concurrency=2))
    try:
        api = client(hook_stack, "hook-key")
        job_id = await submit(
            api, {"mode": "semi_auto", "prompts": ["hooked"], "images_per_prompt": 5, "webhook_url": receiver.url}
        )
        final = await wait_final(api, job_id, hook_stack, within=30)
        assert final["status"] == "completed"
        deadline = time.monotonic() + 10
        while True:
            if await redis.hget(keys.job(job_id), "webhook_status") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # a second delivery would show up by now
        assert await redis.hget(keys.job(job_id), "webhook_status") == "delivered"
        assert len(receiver.requests) == 2  # the 502, then the delivery
        headers, body = receiver.requests[-1]
        assert verify_signature(project_webhook_secret(settings, PROJECT), body, headers["Bunch-Signature"])
        job = json.loads(body)["job"]
        assert job["id"] == job_id and job["status"] == "completed"
        assert job["progress"]["images_succeeded"] == 5 and job["zip"]["ready"]
        async with httpx.AsyncClient() as plain:
            archive = await plain.get(job["zip"]["url"])
        assert archive.status_code == 200 and archive.content[:2] == b"PK"
    finally:
        stop.set()
        await asyncio.wait_for(notifier, 10)
        await redis.aclose()
