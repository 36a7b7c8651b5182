"""HMAC tokens carried in the RunPod webhook URL (RunPod webhooks are unsigned, so the URL is the proof)."""

import hashlib
import hmac
import time
from dataclasses import dataclass

SEPARATOR = "~"  # unreserved in URLs, never part of a run id


@dataclass(frozen=True)
class WebhookClaim:
    run_id: str
    attempt: int
    claim: str  # "" in tokens issued before claims had names


def issue(secret: str, run_id: str, attempt: int, claim: str, ttl_seconds: int, now: float | None = None) -> str:
    expires = int((now or time.time()) + ttl_seconds)
    fields = (run_id, str(attempt), claim, str(expires)) if claim else (run_id, str(attempt), str(expires))
    body = SEPARATOR.join(fields)
    return f"{body}{SEPARATOR}{_sign(secret, body)}"


def verify(secret: str, token: str, now: float | None = None) -> WebhookClaim | None:
    """The run, attempt and claim the token was issued for, or None if forged, altered or expired."""
    parts = token.split(SEPARATOR)
    if len(parts) == 4:  # issued before claims had names, by the release before this one
        parts.insert(2, "")
    if len(parts) != 5:
        return None
    run_id, attempt, claim, expires, signature = parts
    body = SEPARATOR.join((run_id, attempt, claim, expires) if claim else (run_id, attempt, expires))
    if not hmac.compare_digest(signature, _sign(secret, body)):
        return None
    if not attempt.isdigit() or not expires.isdigit() or int(expires) < (now or time.time()):
        return None
    return WebhookClaim(run_id, int(attempt), claim)


def _sign(secret: str, body: str) -> str:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
