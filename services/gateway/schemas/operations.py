"""The bodies of the probes and of the webhook routes."""

from pydantic import BaseModel


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready" or "unavailable"
    redis: bool
    # Why Redis is not usable, when it is not: unreachable, a wrong password, an unknown master.
    redis_problem: str | None = None
    storage: bool
    # Redis's used memory over its maxmemory (None: no limit set, or unreachable), and whether it is
    # past the point where new jobs are refused: still ready, for every other request.
    redis_memory_fraction: float | None = None
    redis_memory_pressure: bool = False


class WebhookAnswer(BaseModel):
    accepted: bool
    # Why a callback with a valid token was not passed on (nothing changed).
    reason: str | None = None


class WebhookSecret(BaseModel):
    secret: str
    header: str = "Bunch-Signature"
    scheme: str = 't=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">'
