"""What the dispatcher sends to RunPod for one run: links, never image bytes (RunPod caps /run at 10 MB)."""

from collections.abc import Sequence

from shared import keys, planning, tokens
from shared.models import RunInput, RunLimits, WorkItem
from shared.planning import JobConfig
from shared.settings import Settings
from shared.storage import Storage

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot be valid longer


def build_run_input(
    config: JobConfig,
    run_id: str,
    slots: Sequence[int],
    attempt: int,
    claim: str,
    storage: Storage,
    settings: Settings,
) -> RunInput:
    job_id, _ = keys.split_run_id(run_id)
    reference_urls: dict[str, str] = {}

    # A run may wait in RunPod's queue up to its ttl before a worker opens these links.
    expires = link_lifetime_seconds(settings)

    def reference_url(upload_id: str) -> str:
        # Presign each reference once per run, not once per image.
        if upload_id not in reference_urls:
            reference_urls[upload_id] = storage.worker_links.get(keys.upload_object(upload_id), expires_seconds=expires)
        return reference_urls[upload_id]

    items = []
    for index in slots:
        slot = planning.slot(config, index)
        items.append(
            WorkItem(
                index=index,
                prompt=slot.prompt,
                reference_urls=[reference_url(ref) for ref in slot.reference_ids],
                output_url=storage.worker_links.put(
                    keys.image_object(run_id, index, attempt, claim), expires_seconds=expires
                ),
            )
        )
    return RunInput(
        task=planning.task_name(config),
        job_id=job_id,
        run_id=run_id,
        attempt=attempt,
        model=settings.gemini_model,
        params=config.params,
        items=items,
        limits=run_limits(settings),
    )


def run_limits(settings: Settings) -> RunLimits:
    """The worker's budget: every attempt of every image, and the transfers, end before RunPod's
    executionTimeout stops the run (shared.settings.Settings checked the sum at start-up)."""
    return RunLimits(
        gemini_timeout_seconds=settings.gemini_timeout_seconds,
        gemini_max_attempts=settings.gemini_max_attempts,
        gemini_backoff_max_seconds=settings.gemini_backoff_max_seconds,
        budget_seconds=settings.image_time_budget_seconds(),
    )


def link_lifetime_seconds(settings: Settings) -> int:
    """How long a run's links stay valid: its RunPod ttl (which covers the wait in RunPod's queue
    and the execution) plus the webhook grace, within S3's 7-day limit on presigned URLs."""
    return min(MAX_PRESIGN_SECONDS, settings.run_ttl_seconds + round(settings.webhook_grace_seconds))


def webhook_url(run_id: str, attempt: int, claim: str, settings: Settings) -> str:
    token = tokens.issue(
        settings.webhook_secret.get_secret_value(), run_id, attempt, claim, settings.webhook_token_ttl_seconds
    )
    return f"{settings.public_url}/internal/runpod/webhook?token={token}"


def policy(settings: Settings) -> dict[str, int]:
    return {"executionTimeout": settings.execution_timeout_seconds * 1000, "ttl": settings.run_ttl_seconds * 1000}
