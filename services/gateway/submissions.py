"""Accepting a job: check what pydantic cannot (limits from settings, the webhook's host, the
uploads and dataset it names), resolve its group, then store it queued in one atomic call."""

import asyncio

from services.gateway.deps import Services
from services.gateway.schemas.jobs import JobAccepted, JobLinks
from shared import keys, planning
from shared.errors import Invalid, MissingKeys
from shared.ids import is_id
from shared.models import AutomaticJobRequest, SemiAutoJobRequest
from shared.planning import JobConfig
from shared.settings import Settings
from shared.webhook_safety import webhook_url_problem


async def submit(services: Services, project: str, config: JobConfig, retry_of: str | None = None) -> JobAccepted:
    """Queue the job; Invalid (nothing stored) if anything it names or asks for is not allowed."""
    if isinstance(config, AutomaticJobRequest) and config.dataset_id:
        inputs = await services.datasets.input_ids(project, config.dataset_id)
        if inputs is None:
            raise Invalid(f"Unknown dataset_id {config.dataset_id!r}: upload it with POST /api/datasets.")
        # The job keeps the dataset's ids: later changes to the dataset do not change the job.
        config = config.model_copy(update={"input_ids": inputs})
    upload_ids = await _check_limits(config, services.settings)
    required = [keys.upload(project, upload_id) for upload_id in upload_ids]
    store = services.store
    dataset_id = config.dataset_id if isinstance(config, AutomaticJobRequest) else None
    try:
        if is_id(config.group):
            # A job may name its group by id; it stores the group's name: look the id up first.
            group_id, group_name = await services.groups.resolve(project, config.group, required=required)
            config = config.model_copy(update={"group": group_name})
            job = await store.create(project, config, group_id=group_id, retry_of=retry_of, dataset_id=dataset_id)
        else:  # a name is the group's name: one call checks, resolves and creates
            job = await store.create(
                project,
                config,
                group_name=config.group,
                retry_of=retry_of,
                required=required,
                dataset_id=dataset_id,
            )
    except MissingKeys as exc:
        missing = [upload_ids[i] for i in exc.indices]
        raise Invalid(
            f"Unknown upload ids: {', '.join(missing[:10])}. Upload the images with POST /api/uploads first."
        ) from None
    return JobAccepted(id=job.id, status=job.status, links=links(job.id))


def links(job_id: str) -> JobLinks:
    base = f"/api/jobs/{job_id}"
    return JobLinks(
        status=f"{base}/status", results=f"{base}/results", download=f"{base}/download", events=f"{base}/events"
    )


async def _check_limits(config: JobConfig, settings: Settings) -> list[str]:
    """Returns the distinct upload ids the job names, whose existence the create call checks."""
    prompts = config.prompts if isinstance(config, SemiAutoJobRequest) else [config.base_prompt]
    too_long = [n for n, prompt in enumerate(prompts) if len(prompt) > settings.max_prompt_chars]
    if too_long:
        where = "base_prompt" if isinstance(config, AutomaticJobRequest) else f"prompts {too_long[:10]}"
        raise Invalid(f"{where}: at most {settings.max_prompt_chars} characters per prompt.")
    if isinstance(config, SemiAutoJobRequest):
        upload_ids = config.reference_ids
        if len(config.prompts) > settings.max_prompts:
            raise Invalid(f"Too many prompts: {len(config.prompts)}; at most {settings.max_prompts}.")
        if len(upload_ids) > settings.max_references:
            raise Invalid(f"Too many reference images: {len(upload_ids)}; at most {settings.max_references}.")
    else:
        upload_ids = config.input_ids
        if len(upload_ids) > settings.max_inputs_per_job:
            raise Invalid(f"Too many input images: {len(upload_ids)}; at most {settings.max_inputs_per_job}.")
    if config.webhook_url:
        problem = await asyncio.to_thread(webhook_url_problem, config.webhook_url, settings.allow_private_webhooks)
        if problem:
            raise Invalid(f"webhook_url: {problem}")
    total = planning.images_total(config)
    if total > settings.max_images_per_job:
        raise Invalid(f"The job asks for {total} images; at most {settings.max_images_per_job} per job.")
    return list(dict.fromkeys(upload_ids))
