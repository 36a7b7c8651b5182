"""The one settings object every service reads (environment variables, `.env` optional)."""

from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUNCH_", env_file=".env", extra="ignore")

    # --- Redis and object storage (the state of record) ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("BUNCH_REDIS_URL", "REDIS_URL"))
    s3_endpoint: str = Field("http://127.0.0.1:9000", validation_alias=AliasChoices("BUNCH_S3_ENDPOINT", "S3_ENDPOINT"))
    # Links handed to clients and RunPod workers are signed for this host; it differs from
    # s3_endpoint when services reach MinIO on an internal name (compose, k8s).
    s3_public_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("BUNCH_S3_PUBLIC_ENDPOINT", "S3_PUBLIC_ENDPOINT")
    )
    s3_access_key: SecretStr = Field(
        SecretStr("minioadmin"), validation_alias=AliasChoices("BUNCH_S3_ACCESS_KEY", "S3_ACCESS_KEY")
    )
    s3_secret_key: SecretStr = Field(
        SecretStr("minioadmin"), validation_alias=AliasChoices("BUNCH_S3_SECRET_KEY", "S3_SECRET_KEY")
    )
    s3_bucket: str = Field("bunch", validation_alias=AliasChoices("BUNCH_S3_BUCKET", "S3_BUCKET"))
    s3_region: str = Field("us-east-1", validation_alias=AliasChoices("BUNCH_S3_REGION", "S3_REGION"))
    presign_expiry_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600)

    # --- HTTP API ---
    # "key1:project_a,key2:project_b"
    api_keys: SecretStr = SecretStr("")
    # Base URL RunPod calls back on; the gateway's address as seen from RunPod.
    public_url: str = "http://127.0.0.1:8000"
    webhook_secret: SecretStr = SecretStr("dev-webhook-secret-change-me")
    webhook_token_ttl_seconds: int = 7 * 24 * 3600

    # --- input limits ---
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    max_references: int = 3
    max_prompts: int = 100
    max_prompt_chars: int = 4000
    max_images_per_job: int = 100_000
    max_inputs_per_job: int = 20_000
    max_variations_per_image: int = 16

    # --- dispatcher ---
    max_concurrency: int = Field(5, ge=1)
    # Runs one project may have in flight at once (0: only the global cap applies).
    project_max_concurrency: int = Field(0, ge=0)
    # Fair share between projects with work: "project:weight,..." (default weight 1). A project of
    # weight 3 gets three runs for every one of a project of weight 1 while both have work.
    project_weights: str = ""
    # Operator quotas per project (0: none): images in queued and processing jobs at once, and jobs
    # submitted per minute (a burst of a minute's worth, then evenly). Over them: 429, nothing stored.
    project_max_queued_images: int = Field(0, ge=0)
    project_max_jobs_per_minute: int = Field(0, ge=0)
    # Runs started per minute across all dispatchers (0: unlimited).
    dispatch_rpm: int = Field(0, ge=0)
    # Runs kept waiting in RunPod's own queue beyond the cap, so a freed worker starts the next run
    # at once instead of after a webhook round trip. They are committed: priority changes and new
    # jobs come after them, and canceling them costs a RunPod /cancel call each.
    dispatch_prefetch: int = Field(0, ge=0)
    # DEBUG adds a line per run started and per run completed (hundreds a second at scale).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    run_size: int = Field(4, ge=1, le=4)
    max_run_attempts: int = Field(3, ge=1)
    retry_backoff_seconds: float = 2.0
    retry_backoff_max_seconds: float = 60.0
    # A run whose webhook has not come by dispatch + execution estimate + this grace is polled.
    webhook_grace_seconds: float = 30.0
    poll_interval_seconds: float = 5.0
    execution_timeout_seconds: int = 600
    run_ttl_seconds: int = 24 * 3600

    # --- RunPod ---
    runpod_base_url: str = Field(
        "https://api.runpod.ai/v2",
        validation_alias=AliasChoices("BUNCH_RUNPOD_BASE_URL", "RUNPOD_ENDPOINT_BASE_URL"),
    )
    runpod_api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("BUNCH_RUNPOD_API_KEY", "RUNPOD_API_KEY")
    )
    runpod_endpoint_id: str = Field(
        "local", validation_alias=AliasChoices("BUNCH_RUNPOD_ENDPOINT_ID", "RUNPOD_ENDPOINT_ID")
    )
    runpod_request_attempts: int = 5

    # --- Gemini (read by the worker too, which has its own copy of these names) ---
    gemini_model: str = "gemini-2.5-flash-image"
    # USD per generated image, by model (JSON in the environment), for the metrics' cost estimate.
    cost_per_image_usd: dict[str, float] = {"gemini-2.5-flash-image": 0.039, "gemini-3-pro-image-preview": 0.134}

    # --- packager ---
    zip_part_size: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)

    # Port of the Prometheus /metrics endpoint of the dispatcher and the packager (0: none); the
    # gateway serves /metrics on its own port.
    metrics_port: int = Field(0, ge=0, le=65535)

    # --- service identity (consumer names must be unique per replica) ---
    consumer_name: str | None = None

    # --- user webhooks (a job's optional `webhook_url`, called when it ends) ---
    # Refuse webhook URLs on private, loopback, link-local ... addresses unless this is set.
    allow_private_webhooks: bool = False
    user_webhook_attempts: int = Field(5, ge=1)
    user_webhook_backoff_seconds: float = Field(1.0, ge=0)  # doubles per attempt, capped at 60 s
    user_webhook_timeout_seconds: float = Field(10.0, gt=0)
    # Master key of the per-project signing secrets (services/packager/notifier.py); when unset it is
    # derived from webhook_secret, which itself is never handed out (it signs RunPod callback tokens).
    user_webhook_secret: SecretStr | None = None

    # --- Server-Sent Events ---
    sse_keepalive_seconds: float = Field(15.0, gt=0)

    # --- datasets and retention ---
    # Finished jobs (and downloads) older than this are deleted with their objects.
    retention_days: int = Field(30, ge=1)
    retention_hour: int = Field(3, ge=0, le=23)  # UTC time of the daily purge
    retention_minute: int = Field(17, ge=0, le=59)
    retention_run_at_startup: bool = False  # also purge once when the packager starts
    max_dataset_entries: int = Field(50_000, ge=1)  # entries of one dataset ZIP, directories included
    max_dataset_bytes: int = Field(20 * 1024**3, ge=1)  # uncompressed total of one dataset

    # --- Redis memory ---
    # New jobs (and redos) are refused with 503 while Redis uses more than this fraction of its
    # maxmemory, so the work already accepted keeps room to finish (Redis runs with noeviction).
    redis_memory_refuse_fraction: float = Field(0.9, gt=0, le=1)

    # --- reliability ---
    # A stream message held this long by a consumer that stopped working on it (dead, or its
    # handler failed) is claimed by another (XAUTOCLAIM); live long work keeps its claim fresh.
    stream_claim_idle_ms: int = Field(30_000, ge=100)
    # Object storage calls: connect and per-read timeouts, and how often one call is retried on
    # connection errors, timeouts and 5xx before it fails (API callers then get a 503).
    s3_connect_timeout_seconds: float = Field(5.0, gt=0)
    s3_read_timeout_seconds: float = Field(60.0, gt=0)
    s3_retries: int = Field(5, ge=0)

    @field_validator("runpod_base_url", "public_url", "s3_endpoint")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("project_weights")
    @classmethod
    def _weights_parse(cls, value: str) -> str:
        parse_weights(value)
        return value

    def weight_by_project(self) -> dict[str, float]:
        return parse_weights(self.project_weights)

    def project_for_key(self) -> dict[str, str]:
        """Parse `BUNCH_API_KEYS` into {api_key: project}."""
        pairs: dict[str, str] = {}
        for entry in self.api_keys.get_secret_value().split(","):
            key, sep, project = entry.strip().partition(":")
            if sep and key and project:
                pairs[key] = project
        return pairs


def parse_weights(text: str) -> dict[str, float]:
    """ "pa:3,pb:0.5" -> {"pa": 3.0, "pb": 0.5}; a malformed entry or a weight <= 0 is an error."""
    weights: dict[str, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        project, sep, value = entry.rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = 0.0
        if not sep or not project or not 0 < weight <= 1000:
            raise ValueError(f"project weight {entry!r}: expected project:weight with 0 < weight <= 1000")
        weights[project] = weight
    return weights


@lru_cache
def get_settings() -> Settings:
    return Settings()
