"""The one settings object every service reads (environment variables, `.env` optional)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.budgets import Budget, parse_budgets
from shared.errors import Misconfigured
from shared.export_destinations import Destination, Destinations, parse_destinations
from shared.pricing import DEFAULT_GEMINI_PRICES, ModelPrices
from shared.secret_files import SecretFiles


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUNCH_", env_file=".env", extra="ignore")
    _destinations: Destinations = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # BUNCH_<NAME>_FILE beside the environment: mounted secrets never pass through it.
        return init_settings, SecretFiles(settings_cls), env_settings, dotenv_settings, file_secret_settings

    # "development" lets the services start with the well-known local secrets (`make dev`, tests);
    # anywhere else they refuse to start with an empty or published secret (shared/secret_policy.py).
    env: Literal["development", "production"] = "production"

    # --- Redis and object storage (the state of record) ---
    # redis://, rediss:// (TLS), unix://, or a primary watched by Sentinel:
    # redis+sentinel://[[user]:password@]host1:26379,host2:26379/<master-name>[/<db>] (rediss+sentinel://
    # for TLS to the Sentinels and the primary). The password is the primary's (shared/redis_connection.py).
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("BUNCH_REDIS_URL", "REDIS_URL"))
    # The Sentinels' own password (their `requirepass`), when they have one.
    redis_sentinel_password: SecretStr = SecretStr("")
    # CA bundle that signs the certificates of Redis and Sentinel, for rediss:// URLs (default: the system's).
    redis_tls_ca_file: str | None = None
    # Replicas each run's claim and outcome waits for (Redis WAIT) before the dispatcher acts on it,
    # at most redis_wait_timeout_ms: 0 does not wait (replication stays asynchronous).
    redis_wait_replicas: int = Field(0, ge=0)
    redis_wait_timeout_ms: int = Field(100, ge=1)
    s3_endpoint: str = Field("http://127.0.0.1:9000", validation_alias=AliasChoices("BUNCH_S3_ENDPOINT", "S3_ENDPOINT"))
    # Links handed to clients and RunPod workers are signed for this host; it differs from
    # s3_endpoint when services reach MinIO on an internal name (compose, k8s).
    s3_public_endpoint: str | None = Field(
        None, validation_alias=AliasChoices("BUNCH_S3_PUBLIC_ENDPOINT", "S3_PUBLIC_ENDPOINT")
    )
    # The host the links handed to RunPod workers are signed for (default: s3_public_endpoint): the
    # object store's internal name when the workers run beside it (compose's `local` profile).
    s3_worker_endpoint: str | None = None
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
    # Also a folder with one `key:project` per file (a Kubernetes Secret mounted as files, one entry
    # per key, so one tenant's key is rotated without touching the others'). Read at start.
    api_keys_dir: Path | None = None
    # Base URL RunPod calls back on; the gateway's address as seen from RunPod.
    public_url: str = "http://127.0.0.1:8000"
    webhook_secret: SecretStr = SecretStr("")
    webhook_token_ttl_seconds: int = 7 * 24 * 3600
    # Browser apps served from these origins may call the API directly: exact origins
    # ("https://app.example.com,http://localhost:3000"), comma-separated; empty: none. No wildcard:
    # the API key travels in a header any origin could otherwise make a browser send.
    cors_origins: str = ""
    # How long the first answer to an Idempotency-Key is kept and replayed to a repeat of its request.
    idempotency_ttl_seconds: int = Field(24 * 3600, ge=60)
    # A repeat that arrives while the first request is still running waits this long for its
    # answer, then gets 409 with Retry-After.
    idempotency_wait_seconds: float = Field(10.0, ge=0)
    # A claimed key whose request never answers (its gateway killed mid-request) is freed after this.
    idempotency_lock_seconds: int = Field(300, ge=1)

    # --- gateway server --- (services/gateway/server.py)
    # A request's headers must be in this long after connecting or after the previous response.
    gateway_header_timeout_seconds: float = Field(10.0, gt=0)
    # A body with no bytes for this long while the gateway waits for them is dropped; so is one
    # slower on average than the minimum rate past that time (0: no minimum).
    gateway_body_timeout_seconds: float = Field(20.0, gt=0)
    gateway_body_min_bytes_per_second: int = Field(1024, ge=0)
    # An idle keep-alive connection is closed after this long.
    gateway_keep_alive_seconds: int = Field(5, ge=1)
    # Requests in the app at once per process, SSE streams left out (more get 503): 512 is over
    # twice the 200 clients bench/ runs, and at ~1 MiB each (a JSON body, a multipart part before it
    # is spooled to disk) fits the 1 GiB memory limit of deploy/k8s/base/gateway.yaml.
    gateway_max_concurrent_requests: int = Field(512, ge=1)
    # Open client connections per process (more are closed at once), bounded further by the process's
    # RLIMIT_NOFILE: the gateway raises its soft limit to the hard one (up to 65536) at start.
    gateway_max_connections: int = Field(4096, ge=1)

    # --- input limits ---
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    # References per job; unset, the model's own limit (shared/gemini_models.py: 3 for
    # gemini-2.5-flash-image, 14 for gemini-3-pro-image-preview). Set, the lower of the two.
    max_references: int | None = Field(None, ge=0)
    max_prompts: int = 100
    max_prompt_chars: int = 4000
    max_images_per_job: int = 100_000
    max_inputs_per_job: int = 20_000

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
    # Saved batches (/api/batches) one project may keep at once (0: no limit); more: 409.
    project_max_saved_batches: int = Field(1000, ge=0)
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
    # RunPod's policy per run, within RunPod's bounds (executionTimeout 5 s - 7 d, ttl 10 s - 7 d).
    # The ttl covers the wait in RunPod's queue and the execution: a run still running at its ttl is
    # deleted, so it must exceed the execution timeout.
    execution_timeout_seconds: int = Field(600, ge=5, le=7 * 24 * 3600)
    run_ttl_seconds: int = Field(24 * 3600, ge=10, le=7 * 24 * 3600)
    # /status answers of 401, 403 or 405 for one run (a rotated key, a deleted endpoint) before the
    # run is given up on as lost instead of asked again.
    poll_max_refusals: int = Field(5, ge=1)
    # The share of RunPod's per-endpoint limits (/run 1,000 per 10 s and 200 at once, /status
    # 2,000 per 10 s and 400 at once, /cancel 100 per 10 s and 20 at once) one dispatcher uses:
    # 1/N with N dispatcher replicas, a little less to leave room for the CLI and the console.
    runpod_limit_share: float = Field(0.9, gt=0, le=1)
    # How often a dispatcher reads RunPod's /health (workers idle, running, throttled; jobs queued)
    # for /api/queue/stats and the console (0: never).
    runpod_health_interval_seconds: float = Field(15.0, ge=0)
    # What a worker reports is checked before it is stored (anyone holding a run's webhook token can
    # report): a claimed image larger than this, or a token count above the next, fails that image.
    # Gemini's image models return a few MB and take at most ~65k tokens per call.
    max_result_image_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_result_tokens: int = Field(1_000_000, ge=0)
    # Stored images checksummed at once per dispatcher (each streams its object in 256 KiB chunks).
    result_verify_concurrency: int = Field(8, ge=1)

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
    # The worker's budget per image, sent with each run (shared.models.RunLimits): each Gemini call
    # times out after gemini_timeout_seconds, a failed one is tried up to gemini_max_attempts times
    # in all, waiting at most gemini_backoff_max_seconds between tries. All of it, plus
    # worker_transfer_allowance_seconds for downloading references and uploading images (each
    # transfer retried within it), must fit in execution_timeout_seconds.
    gemini_timeout_seconds: float = Field(120.0, gt=0)
    gemini_max_attempts: int = Field(3, ge=1)
    gemini_backoff_max_seconds: float = Field(30.0, ge=0)
    worker_transfer_allowance_seconds: float = Field(60.0, ge=0)
    # --- the batch lane (jobs with "lane": "batch": Gemini's Batch API, called by the dispatcher) ---
    # Gemini's own endpoint and key for the batch lane (the realtime lane's key lives in the RunPod
    # endpoint's environment). Empty base URL: Google's.
    gemini_api_key: SecretStr = SecretStr("")
    gemini_base_url: str = ""
    # Images per Gemini batch job: the unit that is submitted, followed, retried when it expires and
    # counted as one of the job's runs (progress "3/4 runs").
    batch_run_size: int = Field(250, ge=1, le=10_000)
    # A batch of at most this many requests, and at most batch_inline_max_bytes, goes inline in the
    # create call (its results come back inline, all at once); larger ones go as a JSONL file
    # through the Files API and their results are streamed back line by line. Gemini's inline
    # batch limit is 20 MB (Batch API guide).
    batch_inline_max_requests: int = Field(8, ge=0)
    batch_inline_max_bytes: int = Field(20_000_000, ge=0, le=20_000_000)
    # A batch is asked for its state this long after it was submitted, then at doubling intervals
    # up to the maximum (Gemini's target turnaround is 24 h; most finish far sooner).
    batch_poll_seconds: float = Field(10.0, gt=0)
    batch_poll_max_seconds: float = Field(120.0, gt=0)
    # How long one dispatcher may work on a batch (submitting it, reading its results) before
    # another replica takes it over as abandoned.
    batch_lease_seconds: float = Field(300.0, gt=0)
    # Images of a project in Gemini batches at once (0: no limit); its next batches wait.
    project_max_batch_images: int = Field(20_000, ge=0)
    # Attempts of one batch (a batch that expires or fails is submitted again as a new attempt);
    # after the last, each of its images fails with the reason.
    batch_max_attempts: int = Field(2, ge=1)

    # --- costs and budgets (shared/pricing.py, shared/budgets.py) ---
    # Gemini's prices per model and lane, USD per million tokens (JSON in the environment:
    # {"<model>": {"realtime": {"input_usd_per_million": 0.3, "output_usd_per_million": 30},
    # "batch": {...}}}); must have the configured gemini_model. Defaults: Google's list prices.
    gemini_prices: dict[str, ModelPrices] = Field(default_factory=lambda: dict(DEFAULT_GEMINI_PRICES))
    # RunPod's price per second of a worker running a run: the endpoint's GPU flex price. Default:
    # $0.00019/s, the 24 GB tier (L4, A5000, 3090) at https://docs.runpod.io/serverless/pricing.
    runpod_price_per_second_usd: float = Field(0.00019, ge=0)
    # A run's time assumed by quotes until runs were observed (RunPod execution and queue ETAs).
    expected_run_seconds: float = Field(20.0, gt=0)
    # A Gemini batch's turnaround assumed by quotes until batches were observed (target: 24 h).
    batch_expected_seconds: float = Field(3600.0, gt=0)
    # Spend limits per project, USD per UTC day or calendar month: "pa:100/day,pb:1000/month".
    # A job whose quote exceeds what is left is refused (402); a project whose recorded spend
    # reaches its budget is paused until the next period or an operator resumes it.
    project_budgets: str = ""

    # --- packager ---
    zip_part_size: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)
    # On SIGTERM a ZIP under way gets this long to finish; then its multipart upload is aborted and
    # the job is left to another replica. The pod's or container's stop grace must be longer.
    packager_shutdown_grace_seconds: float = Field(45.0, ge=0)

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
    # During a rotation of the master key above: the old one, whose signatures are sent beside the
    # new ones (two `v1=` in Bunch-Signature) until every receiver has the new project secret.
    user_webhook_secret_previous: SecretStr | None = None
    # Bearer token Prometheus sends to the gateway's /metrics (every project's counts); unset, the
    # route answers only in development.
    metrics_token: SecretStr | None = None

    # --- Server-Sent Events ---
    sse_keepalive_seconds: float = Field(15.0, gt=0)
    # Events held for one stream whose client is behind; a client further behind is cut (its stream
    # ends and EventSource resumes with Last-Event-ID from the stream in Redis).
    sse_client_buffer: int = Field(1000, ge=1)
    # Event streams one project may hold open at once, per gateway process (each replica counts its
    # own); more get 429 with Retry-After.
    sse_max_streams_per_project: int = Field(100, ge=1)

    # --- datasets and retention ---
    # Finished jobs (and downloads) older than this are deleted with their objects.
    retention_days: int = Field(30, ge=1)
    retention_hour: int = Field(3, ge=0, le=23)  # UTC time of the daily purge
    retention_minute: int = Field(17, ge=0, le=59)
    retention_run_at_startup: bool = False  # also purge once when the packager starts
    max_dataset_entries: int = Field(50_000, ge=1)  # entries of one dataset ZIP, directories included
    max_dataset_bytes: int = Field(20 * 1024**3, ge=1)  # uncompressed total of one dataset
    # What checking one dataset's images may cost a gateway (over either: 413, nothing stored). Pixels
    # are counted from each distinct image's header before it is decoded; the default is a full
    # dataset (max_inputs_per_job) of 4-megapixel images, so only the size of a dataset bounds it.
    max_dataset_pixels: int = Field(80_000_000_000, ge=1)
    # CPU seconds of reading and decoding one dataset's images: ~20 ns for each pixel of the budget
    # above, twice what photos cost on a slow core, so it is met first only by files that are costly
    # per pixel (a progressive JPEG of many scans).
    dataset_cpu_seconds: float = Field(1800.0, gt=0)
    # Threads per gateway process that read and decode dataset images, shared by every request (one
    # project uses one at a time) and at a lower CPU priority, so other requests keep the other cores.
    dataset_decode_threads: int = Field(1, ge=1)

    # --- exports to the projects' own buckets (shared/export_destinations.py) ---
    # JSON {"<project>": {"<name>": {"endpoint", "bucket", "prefix", "region", "access_key_id_env" |
    # "access_key_id_file", "secret_access_key_env" | "secret_access_key_file"}}}; or a file's path
    # in export_destinations_file instead (a mounted ConfigMap). Empty: no project can export.
    export_destinations: str = ""
    export_destinations_file: Path | None = None
    # Exports one packager replica works on at once, and objects one export copies at once: an
    # object in flight holds at most one image (or one multipart part) in memory.
    export_workers: int = Field(4, ge=1)
    export_concurrency: int = Field(8, ge=1, le=64)
    # Exports one project may have queued or running (more get 429): a project that starts many
    # takes at most this many of the export workers, and the other projects' exports go on beside.
    export_max_active_per_project: int = Field(2, ge=1)
    # Tries of one object's copy on connection errors, timeouts, 5xx and throttling, with backoff
    # from export_backoff_seconds, doubling, before the object is reported failed with the reason.
    export_object_attempts: int = Field(4, ge=1)
    export_backoff_seconds: float = Field(0.5, ge=0)
    # A job folder's manifest is manifest.json up to this many images, manifest.jsonl (written in
    # pieces, one line per image) beyond.
    export_manifest_json_max_images: int = Field(1000, ge=1)
    # Per-object errors an export keeps to show (all are counted).
    export_max_errors_kept: int = Field(1000, ge=1)

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

    @model_validator(mode="after")
    def _runs_fit_runpod_policy(self) -> "Settings":
        if self.run_ttl_seconds <= self.execution_timeout_seconds:
            raise ValueError(
                f"run_ttl_seconds ({self.run_ttl_seconds}) must exceed execution_timeout_seconds "
                f"({self.execution_timeout_seconds}): RunPod's ttl covers the execution too"
            )
        needed = self.image_time_budget_seconds()
        if needed > self.execution_timeout_seconds:
            raise ValueError(
                f"an image may take {needed:.0f} s (gemini_max_attempts {self.gemini_max_attempts} x "
                f"gemini_timeout_seconds {self.gemini_timeout_seconds:g} + "
                f"{self.gemini_max_attempts - 1} x gemini_backoff_max_seconds {self.gemini_backoff_max_seconds:g} "
                f"+ worker_transfer_allowance_seconds {self.worker_transfer_allowance_seconds:g}), more than "
                f"execution_timeout_seconds ({self.execution_timeout_seconds}): "
                "RunPod would stop the run before its last attempt; "
                "lower the attempts or the timeout, or raise execution_timeout_seconds"
            )
        return self

    def run_size_for(self, lane: str) -> int:
        """Images per run in the lane: a RunPod run, or a Gemini batch job."""
        return self.batch_run_size if lane == "batch" else self.run_size

    def image_time_budget_seconds(self) -> float:
        """The longest one image may take on a worker: every attempt timing out, every wait at its
        cap, references and upload included."""
        attempts = self.gemini_max_attempts
        return (
            attempts * self.gemini_timeout_seconds
            + (attempts - 1) * self.gemini_backoff_max_seconds
            + self.worker_transfer_allowance_seconds
        )

    @field_validator("runpod_base_url", "public_url", "s3_endpoint", "gemini_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("cors_origins")
    @classmethod
    def _origins_parse(cls, value: str) -> str:
        parse_origins(value)
        return value

    def cors_origin_list(self) -> list[str]:
        return parse_origins(self.cors_origins)

    @field_validator("project_weights")
    @classmethod
    def _weights_parse(cls, value: str) -> str:
        parse_weights(value)
        return value

    def weight_by_project(self) -> dict[str, float]:
        return parse_weights(self.project_weights)

    @field_validator("project_budgets")
    @classmethod
    def _budgets_parse(cls, value: str) -> str:
        parse_budgets(value)
        return value

    def budget_by_project(self) -> dict[str, Budget]:
        return parse_budgets(self.project_budgets)

    @model_validator(mode="after")
    def _model_has_prices(self) -> "Settings":
        if self.gemini_model not in self.gemini_prices:
            raise ValueError(
                f"gemini_prices has no prices for gemini_model {self.gemini_model!r} (it has "
                f"{', '.join(sorted(self.gemini_prices)) or 'none'}): add them to BUNCH_GEMINI_PRICES"
            )
        return self

    @model_validator(mode="after")
    def _destinations_parse(self) -> "Settings":
        # Read once, at start: a missing credential stops the service (exit 2) instead of one export.
        text = self.export_destinations
        if self.export_destinations_file is not None:
            if text.strip():
                both = "BUNCH_EXPORT_DESTINATIONS and BUNCH_EXPORT_DESTINATIONS_FILE"
                raise Misconfigured(f"{both} are both set: keep one")
            try:
                text = self.export_destinations_file.read_text()
            except OSError as exc:
                raise Misconfigured(
                    f"BUNCH_EXPORT_DESTINATIONS_FILE: cannot read {self.export_destinations_file}: {exc.strerror}"
                ) from None
        self._destinations = parse_destinations(text)
        return self

    def export_destinations_of(self, project: str) -> dict[str, Destination]:
        """The project's export destinations by name, credentials read."""
        return self._destinations.get(project, {})

    def project_for_key(self) -> dict[str, str]:
        """`BUNCH_API_KEYS` and the files of `BUNCH_API_KEYS_DIR` as {api_key: project}."""
        entries = self.api_keys.get_secret_value().split(",")
        if self.api_keys_dir is not None:
            entries += [path.read_text() for path in sorted(self.api_keys_dir.iterdir()) if _key_file(path)]
        pairs: dict[str, str] = {}
        for entry in entries:
            key, sep, project = entry.strip().partition(":")
            if sep and key and project:
                pairs[key] = project
        return pairs


def _key_file(path: Path) -> bool:
    # Kubernetes mounts a Secret's entries beside `..data` and a timestamped folder: hidden names.
    return not path.name.startswith(".") and path.is_file()


def parse_origins(text: str) -> list[str]:
    """ "https://a.example,http://localhost:3000" -> the origins; "*", a path or a bare host is an error."""
    origins = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        scheme, sep, rest = entry.partition("://")
        if entry == "*" or not sep or scheme not in ("http", "https") or not rest or "/" in rest or "*" in rest:
            raise ValueError(
                f"CORS origin {entry!r}: expected an exact origin such as https://app.example.com "
                "(scheme and host, an optional port, no path, no wildcard)"
            )
        origins.append(entry)
    return origins


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
