"""RunPod Serverless REST client (plain aiohttp).

Not the runpod SDK: its AsyncioEndpoint.run wraps the whole payload in "input", so `webhook` and `policy`
never reach RunPod, and it does not check HTTP statuses. This speaks the documented REST API directly:
POST {base}/{endpoint}/run, GET .../status/{id}, POST .../cancel/{id}, GET .../health.

Retries: 429, 5xx gateway errors, connection errors and timeouts, with exponential backoff and full jitter
(Retry-After honoured when present, capped at `backoff_max_seconds`). A retried /run can create a second
RunPod job when the first request reached RunPod but its answer was lost (RunPod has no idempotency key),
so the worker side must be idempotent anyway.

Limits: /run, /status and /cancel calls pass a gate that keeps this client within its share of
RunPod's per-endpoint rate and concurrency limits (services/dispatcher/runpod_limits.py).

Errors never carry the API key: messages name the operation and the HTTP status only.
"""

import asyncio
import contextlib
import logging
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from services.dispatcher.runpod_limits import gates
from shared import bounded_json
from shared.errors import UpstreamError

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
# Answers that say Bunch's key or endpoint is refused (a rotated key, a deleted endpoint): asking
# again with the same settings cannot help, and an operator must know.
REFUSED_STATUSES = frozenset({401, 403, 405})
BODY_SNIPPET_CHARS = 200


class RunPodError(UpstreamError):
    """A RunPod call that failed; `retryable` says whether trying again later may help."""

    def __init__(
        self, status: int | None, message: str, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(f"RunPod {status if status is not None else 'no response'}: {message}", retryable=retryable)
        self.status = status  # None when no HTTP answer came (connection error, timeout)
        self.retry_after = retry_after

    @property
    def refused(self) -> bool:
        """RunPod refused Bunch's key or endpoint: no call succeeds until an operator fixes it."""
        return self.status in REFUSED_STATUSES


class RunPodClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        endpoint_id: str,
        api_key: str,
        attempts: int = 5,
        backoff_seconds: float = 0.5,
        backoff_max_seconds: float = 20.0,
        request_timeout_seconds: float = 30.0,
        limit_share: float = 1.0,
    ) -> None:
        self._session = session
        self._endpoint_url = f"{base_url.rstrip('/')}/{endpoint_id}"
        self._headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        self._attempts = max(1, attempts)
        self._backoff = backoff_seconds
        self._backoff_max = backoff_max_seconds
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_seconds)
        self._gates = gates(limit_share)

    def __repr__(self) -> str:  # the default would not leak the key either, but say so explicitly
        return f"RunPodClient({self._endpoint_url!r})"

    async def run(self, input: dict[str, Any], webhook: str | None = None, policy: dict[str, Any] | None = None) -> str:
        """Queue a job; returns RunPod's job id."""
        body: dict[str, Any] = {"input": input}
        if webhook is not None:
            body["webhook"] = webhook
        if policy is not None:
            body["policy"] = policy
        data = await self._request("POST", "run", body)
        job_id = data.get("id") if data is not None else None
        if not isinstance(job_id, str) or not job_id:
            raise RunPodError(200, "run answered without a job id")
        return job_id

    async def status(self, runpod_id: str) -> dict[str, Any] | None:
        """The job's /status body, or None when RunPod no longer knows it (TTL expired / unknown)."""
        return await self._request("GET", f"status/{runpod_id}", not_found_ok=True)

    async def cancel(self, runpod_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job; None when RunPod no longer knows it."""
        return await self._request("POST", f"cancel/{runpod_id}", not_found_ok=True)

    async def health(self) -> dict[str, Any]:
        data = await self._request("GET", "health")
        assert data is not None  # only not_found_ok requests return None
        return data

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, not_found_ok: bool = False
    ) -> dict[str, Any] | None:
        operation = path.split("/", 1)[0]
        for attempt in range(1, self._attempts + 1):
            try:
                return await self._once(method, path, operation, body, not_found_ok)
            except RunPodError as exc:
                if not exc.retryable or attempt == self._attempts:
                    raise
                delay = self._delay(attempt, exc.retry_after)
                log.warning("runpod %s failed (%s), retry %d in %.2fs", operation, exc, attempt, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _once(
        self, method: str, path: str, operation: str, body: dict[str, Any] | None, not_found_ok: bool
    ) -> dict[str, Any] | None:
        url = f"{self._endpoint_url}/{path}"
        gate = self._gates.get(operation)
        try:
            async with (
                gate.slot() if gate is not None else contextlib.nullcontext(),
                self._session.request(method, url, json=body, headers=self._headers, timeout=self._timeout) as resp,
            ):
                if resp.status == 404 and not_found_ok:
                    return None
                if resp.status in RETRYABLE_STATUSES:
                    raise RunPodError(
                        resp.status,
                        f"{operation} answered HTTP {resp.status}",
                        retryable=True,
                        retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                    )
                if resp.status >= 400:
                    raise RunPodError(resp.status, f"{operation}: {await _snippet(resp)}")
                return await _json_object(resp, operation)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RunPodError(None, f"{operation}: {type(exc).__name__}", retryable=True) from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self._backoff_max)
        # Full jitter: many dispatchers hitting one 429 must not come back in lockstep.
        return random.uniform(0, min(self._backoff_max, self._backoff * 2 ** (attempt - 1)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def _snippet(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text(errors="replace")
    return text[:BODY_SNIPPET_CHARS] or f"HTTP {resp.status}"


async def _json_object(resp: aiohttp.ClientResponse, operation: str) -> dict[str, Any]:
    try:
        # Bounded: a /status body carries the worker's output, which is the worker's to shape.
        data = bounded_json.loads(await resp.read())
    except ValueError as exc:
        raise RunPodError(resp.status, f"{operation} answered a body that is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunPodError(resp.status, f"{operation} answered JSON that is not an object")
    return data
