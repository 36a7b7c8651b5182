"""Signing user webhooks: `Bunch-Signature: t=<unix>,v1=<hex HMAC-SHA256 of f"{t}.{body}">`.

The secret is per project, derived with HKDF-SHA256 (RFC 5869) from `user_webhook_secret` (or,
when unset, from `webhook_secret`), never `webhook_secret` itself: that one signs RunPod's callback
tokens, and whoever held it could forge run results. One project's secret tells nothing about
another's or about the master key.

Rotation: set BUNCH_USER_WEBHOOK_SECRET_PREVIOUS to the current master key and
BUNCH_USER_WEBHOOK_SECRET to a new one. Every delivery then carries two `v1=` signatures, one per
key; receivers fetch the new project secret (GET /api/webhooks/secret) at their pace, and the
previous key is removed once they all have.
"""

import hashlib
import hmac
from collections.abc import Sequence

from pydantic import SecretStr

from shared.settings import Settings

SALT = b"bunch user webhooks v2"


def signature_header(secrets: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """`t=<timestamp>,v1=<hex HMAC-SHA256 over b"<timestamp>." + body>`, one v1 per secret."""
    signed = f"{timestamp}.".encode() + body
    digests = [
        hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        for secret in ([secrets] if isinstance(secrets, str) else secrets)
    ]
    return ",".join([f"t={timestamp}", *(f"v1={digest}" for digest in digests)])


def hkdf_sha256(key: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869: extract a pseudorandom key from `key`, expand it to `length` bytes for `info`."""
    pseudorandom = hmac.new(salt, key, hashlib.sha256).digest()
    output, block = b"", b""
    for counter in range(1, -(-length // 32) + 1):
        block = hmac.new(pseudorandom, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
    return output[:length]


def _derive(master: SecretStr, project: str) -> str:
    return hkdf_sha256(master.get_secret_value().encode(), SALT, f"project:{project}".encode()).hex()


def project_webhook_secret(settings: Settings, project: str) -> str:
    """The secret a project's receivers verify `Bunch-Signature` with (one per project)."""
    return _derive(settings.user_webhook_secret or settings.webhook_secret, project)


def project_signing_secrets(settings: Settings, project: str) -> list[str]:
    """The secrets a delivery is signed with: the project's, and during a rotation its previous one."""
    secrets = [project_webhook_secret(settings, project)]
    if settings.user_webhook_secret_previous is not None:
        secrets.append(_derive(settings.user_webhook_secret_previous, project))
    return secrets
