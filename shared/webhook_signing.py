"""Signing user webhooks: `Bunch-Signature: t=<unix>,v1=<hex HMAC-SHA256 of f"{t}.{body}">`.

The secret is per project and derived from `user_webhook_secret` (or, when unset, from
`webhook_secret`), never `webhook_secret` itself: that one signs RunPod's callback tokens, and
whoever held it could forge run results.
"""

import hashlib
import hmac
import time

from shared.settings import Settings


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """`t=<timestamp>,v1=<hex HMAC-SHA256 over b"<timestamp>." + body>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True if `header` signs exactly `body` with `secret` and its timestamp is within tolerance_s of now."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = signature_header(secret, body, timestamp).partition(",v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in signatures)


def project_webhook_secret(settings: Settings, project: str) -> str:
    """The secret a project's receivers verify `Bunch-Signature` with (one per project)."""
    master = settings.user_webhook_secret or settings.webhook_secret
    label = f"bunch user webhooks v1:{project}".encode()
    return hmac.new(master.get_secret_value().encode(), label, hashlib.sha256).hexdigest()
