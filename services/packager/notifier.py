"""User webhooks: tell a job's `webhook_url` that the job ended, signed, retried with backoff (and
an export's that the export ended: {"export_id"} messages, event "export.finished", the export's
status, progress and error as GET /api/exports/{id} gives them).

The job store XADDs {"job_id"} to keys.NOTIFICATIONS_STREAM when a job that has a `webhook_url`
reaches completed, failed or canceled; `run_notifier` reads that stream (consumer group
keys.NOTIFIER_GROUP) and hands each message to a `Notifier`.

Every delivery is a POST of JSON

    {"event": "job.finished", "id": "<delivery id>", "created_at": "...",
     "job": {"id", "status", "mode", "group", "priority", "progress": {...}, "error",
             "created_at", "started_at", "completed_at", "zip": {"ready", "bytes", "url", "url_expires_at"},
             "links": {...}}}

with the header `Bunch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of f"{t}.{body}">` (the
Stripe scheme: the receiver recomputes it with its project's secret, compares in constant time and
refuses stale timestamps, as tests/test_user_webhooks.py does). `Bunch-Delivery` repeats the
delivery id: a delivery can arrive more than once (at-least-once), and the id lets the receiver
drop repeats.

The signing secret is per project and derived from `user_webhook_secret` (or, when unset, from
`webhook_secret`), never `webhook_secret` itself: that one signs RunPod's callback tokens, and
whoever holds it could forge run results. See `project_webhook_secret`.

The outcome is recorded on the job hash: webhook_status (delivered | failed), webhook_error,
webhook_attempts, webhook_http_status, webhook_delivery, webhook_finished_at. A receiver's failure
never raises (the stream message is acknowledged); only a Redis outage or a shutdown mid-delivery
leaves the message pending for another delivery.
"""

import asyncio
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from redis.asyncio import Redis

from shared import keys
from shared.archive import JobArchive
from shared.models import FINAL_JOB_STATUSES
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.exports import FINAL_EXPORT_STATUSES, ExportRecord, ExportStore
from shared.stores.jobs import JobStore
from shared.stores.records import JobRecord
from shared.streams import StreamConsumer, consumer_name
from shared.times import iso
from shared.webhook_safety import address_problem, check_webhook_url
from shared.webhook_signing import project_signing_secrets, signature_header

log = logging.getLogger(__name__)

EVENT = "job.finished"
EXPORT_EVENT = "export.finished"
SIGNATURE_HEADER = "Bunch-Signature"
DELIVERY_HEADER = "Bunch-Delivery"
EVENT_HEADER = "Bunch-Event"
USER_AGENT = "Bunch-Webhooks/1"
MAX_BACKOFF_SECONDS = 60.0

DELIVERED = "delivered"
FAILED = "failed"

# Write the outcome only while the job still exists (retention may have deleted it meanwhile).
# KEYS: job; ARGV: field/value pairs
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


# --- the body ---


def delivery_id(job: JobRecord) -> str:
    """Same for every retry and redelivery of one ending of one job."""
    return f"{job.id}:{job.status.value}:{job.completed_at or ''}"


def build_body(job: JobRecord, storage: Storage, settings: Settings) -> dict[str, Any]:
    zip_info: dict[str, Any] = {"ready": False, "bytes": None, "url": None, "url_expires_at": None}
    if job.zip_key:
        zip_info = {
            "ready": True,
            "bytes": job.zip_bytes,
            "url": storage.presigned_get(job.zip_key, f"bunch-{job.id}.zip"),
            "url_expires_at": iso(time.time() + settings.presign_expiry_seconds),
        }
    api = f"{settings.public_url}/api/jobs/{job.id}"
    return {
        "event": EVENT,
        "id": delivery_id(job),
        "created_at": iso(time.time()),
        "job": {
            "id": job.id,
            "status": job.status.value,
            "mode": job.mode,
            "group": job.group,
            "priority": job.priority,
            "progress": {
                "images_total": job.images_total,
                "images_succeeded": job.images_succeeded,
                "images_failed": job.images_failed,
                "runs_total": job.runs_total,
                "runs_done": job.runs_done,
            },
            "error": job.error,
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "completed_at": iso(job.completed_at),
            "zip": zip_info,
            "links": {
                "status": f"{api}/status",
                "results": f"{api}/results",
                "download": f"{api}/download",
            },
        },
    }


def build_export_body(export: ExportRecord, settings: Settings) -> dict[str, Any]:
    return {
        "event": EXPORT_EVENT,
        "id": f"{export.id}:{export.status.value}",
        "created_at": iso(time.time()),
        "export": {
            "id": export.id,
            "status": export.status.value,
            "destination": export.destination,
            "layout": export.layout.value,
            "group_ids": export.group_ids,
            "job_ids": export.job_ids,
            "progress": export.progress(),
            "error": export.error,
            "created_at": iso(export.created_at),
            "started_at": iso(export.started_at),
            "completed_at": iso(export.completed_at),
            "links": {"status": f"{settings.public_url}/api/exports/{export.id}"},
        },
    }


# --- delivery ---


class PublicOnlyResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver but refuses names that lead to non-public addresses,
    so what is connected to is what was checked (no DNS rebinding between check and connect)."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            kind = address_problem(_ip(result["host"]))
            if kind is not None:
                raise OSError(f"'{host}' resolves to {kind} ({result['host']}); refused")
        return results

    async def close(self) -> None:
        await self._inner.close()


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(value.split("%", 1)[0])


@dataclass
class Outcome:
    status: str  # delivered | failed
    attempts: int
    error: str | None = None
    http_status: int | None = None


class NotifierStopping(Exception):
    """The service is shutting down mid-delivery; the message stays pending and is delivered later."""


class Notifier:
    """Handles one keys.NOTIFICATIONS_STREAM message ({"job_id"}): a StreamConsumer handler."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        storage: Storage,
        *,
        stop: asyncio.Event | None = None,
        backoff_seconds: float | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.storage = storage
        self.store = JobStore(redis, settings, JobArchive(storage))
        self.stop = stop
        self.backoff = settings.user_webhook_backoff_seconds if backoff_seconds is None else backoff_seconds
        self._record = redis.register_script(_RECORD)
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, fields: dict[str, str]) -> None:
        if "export_id" in fields:
            await self.notify_export(fields["export_id"])
        else:
            await self.notify(fields["job_id"])

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = None if self.settings.allow_private_webhooks else PublicOnlyResolver()
            connector = aiohttp.TCPConnector(resolver=resolver, limit=100, limit_per_host=4)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.user_webhook_timeout_seconds),
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
            )
        return self._session

    async def notify(self, job_id: str) -> Outcome | None:
        """Deliver the job's webhook once per ending; None when there is nothing (more) to send."""
        job = await self.store.get(job_id)
        if job is None or job.status not in FINAL_JOB_STATUSES:
            log.info("webhook for job %s skipped: job %s", job_id, "gone" if job is None else job.status.value)
            return None
        url, done_delivery = await self.redis.hmget(keys.job(job_id), "webhook_url", "webhook_delivery")
        if not url:
            url = getattr(await self.store.config(job_id), "webhook_url", None)
        if not url:
            return None
        delivery = delivery_id(job)
        if done_delivery == delivery:
            return None  # a redelivered message: this ending was already handled
        body = json.dumps(build_body(job, self.storage, self.settings), separators=(",", ":")).encode()
        outcome = await self.deliver(url, body, project_signing_secrets(self.settings, job.project), delivery)
        await self._record(keys=[keys.job(job_id)], args=_outcome_fields(outcome, delivery))
        level = logging.INFO if outcome.status == DELIVERED else logging.WARNING
        log.log(
            level,
            "webhook for job %s %s after %s attempt(s): %s",
            job_id,
            outcome.status,
            outcome.attempts,
            outcome.error or outcome.http_status,
        )
        return outcome

    async def notify_export(self, export_id: str) -> Outcome | None:
        """Deliver an ended export's webhook once; None when there is nothing (more) to send."""
        export = await ExportStore(self.redis).find(export_id)
        if export is None or export.status not in FINAL_EXPORT_STATUSES or not export.webhook_url:
            return None
        delivery = f"{export.id}:{export.status.value}"
        if await self.redis.hget(keys.export(export_id), "webhook_delivery") == delivery:
            return None  # a redelivered message: this ending was already handled
        body = json.dumps(build_export_body(export, self.settings), separators=(",", ":")).encode()
        secrets = project_signing_secrets(self.settings, export.project)
        outcome = await self.deliver(export.webhook_url, body, secrets, delivery, EXPORT_EVENT)
        await self._record(keys=[keys.export(export_id)], args=_outcome_fields(outcome, delivery))
        log.info("webhook for export %s %s after %s attempt(s)", export_id, outcome.status, outcome.attempts)
        return outcome

    async def deliver(self, url: str, body: bytes, secrets: list[str], delivery: str, event: str = EVENT) -> Outcome:
        """POST `body` to `url` until it is accepted (2xx) or settings.user_webhook_attempts are used up.

        Connection errors, timeouts, 5xx and 429 are retried with exponential backoff (429/503
        Retry-After honoured up to a minute); any other answer ends the delivery as failed.
        """
        attempts = self.settings.user_webhook_attempts
        last_error = "not attempted"
        last_status: int | None = None
        for attempt in range(1, attempts + 1):
            retry_after: float | None = None
            problem, transient = await asyncio.to_thread(check_webhook_url, url, self.settings.allow_private_webhooks)
            if problem is not None and not transient:
                return Outcome(FAILED, attempt - 1, problem, last_status)
            if problem is not None:
                last_error = problem
            else:
                timestamp = int(time.time())
                headers = {
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: signature_header(secrets, body, timestamp),
                    DELIVERY_HEADER: delivery,
                    EVENT_HEADER: event,
                }
                try:
                    async with self._http().post(url, data=body, headers=headers, allow_redirects=False) as response:
                        last_status = response.status
                        await response.content.read(4096)  # a bounded look; the body is not needed
                        if 200 <= response.status < 300:
                            return Outcome(DELIVERED, attempt, None, response.status)
                        last_error = f"the receiver answered HTTP {response.status}"
                        if 300 <= response.status < 400:
                            where = response.headers.get("Location", "?")
                            return Outcome(
                                FAILED,
                                attempt,
                                f"{last_error} (a redirect to {where}); redirects are not followed, give the final URL",
                                response.status,
                            )
                        if response.status != 429 and response.status < 500:
                            return Outcome(FAILED, attempt, last_error, response.status)
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    last_error = f"could not reach the receiver: {type(exc).__name__}: {exc}".rstrip(": ")
            if attempt < attempts:
                delay = min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_BACKOFF_SECONDS))
                await self._sleep(delay)
        return Outcome(FAILED, attempts, f"gave up after {attempts} attempts; last: {last_error}", last_status)

    async def _sleep(self, seconds: float) -> None:
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise NotifierStopping("shutting down; the delivery resumes from the stream later")


def _outcome_fields(outcome: Outcome, delivery: str) -> list[Any]:
    """A delivery's outcome, as the job's or export's hash records it."""
    return [
        *("webhook_status", outcome.status, "webhook_error", outcome.error or ""),
        *("webhook_attempts", outcome.attempts, "webhook_http_status", outcome.http_status or ""),
        *("webhook_delivery", delivery, "webhook_finished_at", time.time()),
    ]


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None  # an HTTP date: rare for webhooks, the backoff applies


async def run_notifier(
    redis: Redis, settings: Settings, storage: Storage, stop: asyncio.Event, *, concurrency: int = 4
) -> None:
    """The notifier loop for a service's `run_until_signalled` list:
    `functools.partial(run_notifier, redis, settings, storage)`.

    `concurrency` consumers in the group, so one slow receiver does not hold up the others.
    """
    notifier = Notifier(redis, settings, storage, stop=stop)
    base = consumer_name(settings, "packager")
    consumers = [
        StreamConsumer(
            redis,
            keys.NOTIFICATIONS_STREAM,
            keys.NOTIFIER_GROUP,
            f"{base}-notifier-{n}",
            notifier,
            batch=1,
            heartbeat=True,  # retries can outlast claim_idle_ms; keep the message ours meanwhile
            claim_idle_ms=settings.stream_claim_idle_ms,
        )
        for n in range(max(concurrency, 1))
    ]
    try:
        await asyncio.gather(*(consumer.run(stop) for consumer in consumers))
    finally:
        await notifier.aclose()
