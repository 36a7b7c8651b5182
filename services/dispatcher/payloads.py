"""What the dispatcher sends to RunPod for one run: links, never image bytes (RunPod caps /run at 10 MB)."""

from collections.abc import Sequence

from shared import keys, planning, tokens
from shared.models import RunInput, WorkItem
from shared.planning import JobConfig
from shared.settings import Settings
from shared.storage import Storage


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

    def reference_url(upload_id: str) -> str:
        # Presign each reference once per run, not once per image.
        if upload_id not in reference_urls:
            reference_urls[upload_id] = storage.presigned_get(keys.upload_object(upload_id))
        return reference_urls[upload_id]

    items = []
    for index in slots:
        slot = planning.slot(config, index)
        items.append(
            WorkItem(
                index=index,
                prompt=slot.prompt,
                reference_urls=[reference_url(ref) for ref in slot.reference_ids],
                output_url=storage.presigned_put(keys.image_object(run_id, index, attempt, claim)),
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
    )


def webhook_url(run_id: str, attempt: int, claim: str, settings: Settings) -> str:
    token = tokens.issue(
        settings.webhook_secret.get_secret_value(), run_id, attempt, claim, settings.webhook_token_ttl_seconds
    )
    return f"{settings.public_url}/internal/runpod/webhook?token={token}"


def policy(settings: Settings) -> dict[str, int]:
    return {"executionTimeout": settings.execution_timeout_seconds * 1000, "ttl": settings.run_ttl_seconds * 1000}
