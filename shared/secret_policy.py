"""Refusing to start with a secret anyone could know.

Outside `BUNCH_ENV=development` every service checks its secrets before it serves: an empty one,
one published in Bunch's own files (compose defaults, examples, the local stack), or one too short
to resist guessing stops the process with a message naming the setting. Bunch's defaults are there
for a laptop; a deployment that forgot one must not quietly run with it.
"""

from urllib.parse import unquote

from pydantic import SecretStr

from shared.errors import Misconfigured
from shared.settings import Settings

# Values in Bunch's docs, examples and local stack, and the usual placeholders.
PUBLISHED = frozenset(
    {
        "minioadmin",
        "change-me",
        "changeme",
        "replace-me",
        "secret",
        "password",
        "dev-key",
        "dev-webhook-secret-change-me",
        "local-webhook-secret",
        "emulator-key",
        "local-redis-password",
        "local-sentinel-password",
        "replace-me-redis-password",
        "replace-me-sentinel-password",
    }
)
MIN_SECRET_CHARS = 32  # signing keys: 32 random characters carry some 190 bits
MIN_API_KEY_CHARS = 20
MIN_S3_SECRET_CHARS = 16
MIN_REDIS_PASSWORD_CHARS = 16  # Redis may run without one (a private network); if set, it must hold


class UnsafeSecrets(Misconfigured):
    """The settings name secrets a deployment must not run with; the message lists them."""


def _weak(value: str, min_chars: int) -> str | None:
    if not value:
        return "is empty"
    if value.lower() in PUBLISHED:
        return "is a published default"
    if len(value) < min_chars:
        return f"is shorter than {min_chars} characters"
    return None


def problems(settings: Settings) -> list[str]:
    """What is wrong with the settings' secrets, one line per setting (empty when all are fine)."""
    found: list[str] = []

    def check(name: str, secret: SecretStr | None, min_chars: int, optional: bool = False) -> None:
        if secret is None or (optional and not secret.get_secret_value()):
            return
        if why := _weak(secret.get_secret_value(), min_chars):
            found.append(f"{name} {why}")

    check("BUNCH_WEBHOOK_SECRET", settings.webhook_secret, MIN_SECRET_CHARS)
    check("BUNCH_USER_WEBHOOK_SECRET", settings.user_webhook_secret, MIN_SECRET_CHARS, optional=True)
    check("BUNCH_USER_WEBHOOK_SECRET_PREVIOUS", settings.user_webhook_secret_previous, MIN_SECRET_CHARS, True)
    check("BUNCH_METRICS_TOKEN", settings.metrics_token, MIN_SECRET_CHARS, optional=True)
    check("BUNCH_S3_SECRET_KEY", settings.s3_secret_key, MIN_S3_SECRET_CHARS)
    check("BUNCH_REDIS_URL's password", SecretStr(_url_password(settings.redis_url)), MIN_REDIS_PASSWORD_CHARS, True)
    check("BUNCH_REDIS_SENTINEL_PASSWORD", settings.redis_sentinel_password, MIN_REDIS_PASSWORD_CHARS, optional=True)
    if settings.s3_access_key.get_secret_value().lower() in PUBLISHED:
        found.append("BUNCH_S3_ACCESS_KEY is a published default")
    for key, project in settings.project_for_key().items():
        if why := _weak(key, MIN_API_KEY_CHARS):
            found.append(f"BUNCH_API_KEYS: the key of project {project!r} {why}")
    return found


def _url_password(url: str) -> str:
    credentials, at, _ = url.partition("://")[2].partition("@")
    return unquote(credentials.partition(":")[2]) if at else ""


def refuse_unsafe_secrets(settings: Settings) -> None:
    """Raise UnsafeSecrets unless the secrets are fine or this is a development setup."""
    if settings.env == "development":
        return
    if found := problems(settings):
        raise UnsafeSecrets(
            "Refusing to start with unsafe secrets: "
            + "; ".join(found)
            + ". Set them to long random values (or BUNCH_ENV=development on a laptop)."
        )
