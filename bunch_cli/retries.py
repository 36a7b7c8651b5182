"""When a request that creates something is sent again, and after how long.

Every such request carries an Idempotency-Key, made once for it and kept across its attempts: the
gateway answers a repeat of a key it has seen with the first answer, so sending the same request
again after a lost answer never queues a second job. Without the key, only a request that surely
never reached the server could be repeated safely.
"""

import email.utils
import time
import uuid

import httpx

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
# Waits between the attempts of one request: 4 attempts in all, some 3.5 s, enough for a gateway
# that is restarting or a connection cut mid-answer, and short enough for a person at a terminal.
BACKOFF_SECONDS = (0.5, 1.0, 2.0)
ATTEMPTS = len(BACKOFF_SECONDS) + 1
# A server's Retry-After is followed up to this; a longer one (a whole outage) is not waited out here.
MAX_WAIT_SECONDS = 4.0


def new_key() -> str:
    return str(uuid.uuid4())


def retry_after(response: httpx.Response) -> float | None:
    """The response's Retry-After in seconds (a number or an HTTP date), None without a usable one."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def wait_before_retry(response: httpx.Response, attempt: int) -> float | None:
    """How long to wait before sending the request again after `response` to attempt number
    `attempt` (from 1), or None when its answer stands: success, a refusal, or the last attempt.

    A 409 with Retry-After is the same key's first request still running; a 5xx may have happened
    before anything was created (errors are not kept for the key, so the repeat runs again)."""
    if attempt >= ATTEMPTS:
        return None
    status = response.status_code
    after = retry_after(response)
    if status >= 500 or (status == 409 and after is not None):
        return min(after, MAX_WAIT_SECONDS) if after is not None else BACKOFF_SECONDS[attempt - 1]
    return None


def wait_after_transport_error(attempt: int) -> float | None:
    """The answer was lost (refused, reset, timed out): the request may or may not have run."""
    return BACKOFF_SECONDS[attempt - 1] if attempt < ATTEMPTS else None
