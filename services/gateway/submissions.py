"""Accepting a job: check what pydantic cannot (limits from settings, what the Gemini model takes,
the webhook's host, the uploads and dataset it names) and that the project's budget has room for
it (services/gateway/quotes.py), resolve its group, then store it queued in one atomic call."""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Response

from services.gateway.deps import Services
from services.gateway.quotes import check_budget
from services.gateway.schemas.jobs import JobAccepted, JobLinks
from services.gateway.schemas.uploads import UploadInfo
from shared import keys, planning
from shared.errors import Invalid, MissingKeys, NotFound
from shared.gemini_models import GeminiModel, prompt_bytes, reference_bytes, spec_for
from shared.ids import is_id
from shared.models import AutomaticJobRequest, SemiAutoJobRequest
from shared.planning import JobConfig
from shared.settings import Settings
from shared.stores.batches import lane_is_off
from shared.stores.records import JobRecord
from shared.stores.saved_batches import SAVED_BATCH_NOT_FOUND
from shared.webhook_safety import webhook_url_problem

SHOWN = 10  # ids named in one message
# Upload records parsed on the event loop at once (some 4 us each); more go to a thread, so a
# 20,000-input job does not hold up every other request.
INLINE_RECORDS = 500


@dataclass(frozen=True, slots=True)
class Checked:
    """A job as a submit would store it, checked: its config (a dataset's inputs filled in), the
    distinct uploads it names and their records' keys."""

    config: JobConfig
    upload_ids: list[str]
    required: list[str]


async def check(services: Services, project: str, config: JobConfig, model: GeminiModel | None = None) -> Checked:
    """Everything a submit checks before storing, reading only: Invalid if anything the job names or
    asks for is not allowed. `model`: what Gemini takes, by default the configured model's."""
    model = model or spec_for(services.settings.gemini_model)
    if config.lane == "batch" and await lane_is_off(services.redis):
        raise Invalid(
            'lane "batch": the batch lane is off on this deployment (its dispatchers have no Gemini API key, '
            'BUNCH_GEMINI_API_KEY); use lane "realtime", or ask the operator to set the key.'
        )
    if isinstance(config, AutomaticJobRequest) and config.dataset_id:
        inputs = await services.datasets.input_ids(project, config.dataset_id)
        if inputs is None:
            raise Invalid(f"Unknown dataset_id {config.dataset_id!r}: upload it with POST /api/datasets.")
        # The job keeps the dataset's ids: later changes to the dataset do not change the job.
        config = config.model_copy(update={"input_ids": inputs})
    upload_ids = await _check_limits(config, services.settings, model)
    required = [keys.upload(project, upload_id) for upload_id in upload_ids]
    await _check_uploads(services, project, config, model, upload_ids, required)
    return Checked(config, upload_ids, required)


async def submit(
    services: Services,
    project: str,
    config: JobConfig,
    retry_of: str | None = None,
    *,
    model: GeminiModel | None = None,
    budget_checked: bool = False,
    batch_id: str | None = None,
) -> JobAccepted:
    """Queue the job; Invalid (nothing stored) if anything it names or asks for is not allowed,
    OverBudget if it would cost more than the project's budget has left (`budget_checked`: the
    caller checked it, with other jobs it submits). `batch_id`: the saved batch it is queued from,
    which must still exist when the job is stored (else NotFound, nothing stored)."""
    checked = await check(services, project, config, model)
    config, upload_ids, required = checked.config, checked.upload_ids, checked.required
    if batch_id is not None:
        required = [*required, keys.saved_batch(batch_id)]
    if not budget_checked:
        await check_budget(services, project, [config])
    store = services.store
    dataset_id = config.dataset_id if isinstance(config, AutomaticJobRequest) else None
    try:
        if is_id(config.group):
            # A job may name its group by id; it stores the group's name: look the id up first.
            group_id, group_name = await services.groups.resolve(project, config.group, required=required)
            config = config.model_copy(update={"group": group_name})
            job = await store.create(
                project,
                config,
                group_id=group_id,
                retry_of=retry_of,
                required=required,
                dataset_id=dataset_id,
                batch_id=batch_id,
            )
        else:  # a name is the group's name: one call checks, resolves and creates
            job = await store.create(
                project,
                config,
                group_name=config.group,
                retry_of=retry_of,
                required=required,
                dataset_id=dataset_id,
                batch_id=batch_id,
            )
    except MissingKeys as exc:
        if batch_id is not None and len(upload_ids) in exc.indices:
            raise NotFound(SAVED_BATCH_NOT_FOUND) from None
        raise _unknown([upload_ids[i] for i in exc.indices]) from None
    return JobAccepted(id=job.id, status=job.status, links=links(job.id))


async def resubmit(
    services: Services, project: str, job: JobRecord, config: JobConfig | None = None, *, budget_checked: bool = False
) -> JobAccepted:
    """A retry of `job`: a job of its own from its config (`config`: already read), queued from the
    same saved batch while that batch exists, so the batch's latest job is the retry."""
    config = config or await services.store.config(job.id)
    batch_id = job.batch_id if job.batch_id and await services.redis.exists(keys.saved_batch(job.batch_id)) else None
    return await submit(services, project, config, retry_of=job.id, budget_checked=budget_checked, batch_id=batch_id)


def located(response: Response, accepted: JobAccepted) -> JobAccepted:
    """`accepted`, with the new job's address in the answer's Location header."""
    response.headers["Location"] = f"/api/jobs/{accepted.id}"
    return accepted


def links(job_id: str) -> JobLinks:
    base = f"/api/jobs/{job_id}"
    return JobLinks(
        status=f"{base}/status", results=f"{base}/results", download=f"{base}/download", events=f"{base}/events"
    )


def _unknown(upload_ids: Sequence[str]) -> Invalid:
    return Invalid(
        f"Unknown upload ids: {', '.join(upload_ids[:SHOWN])}. Upload the images with POST /api/uploads first."
    )


async def _check_limits(config: JobConfig, settings: Settings, model: GeminiModel) -> list[str]:
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
        _check_reference_count(len(upload_ids), settings, model)
    else:
        upload_ids = config.input_ids
        if len(upload_ids) > settings.max_inputs_per_job:
            raise Invalid(f"Too many input images: {len(upload_ids)}; at most {settings.max_inputs_per_job}.")
    _check_params(config, model)
    if config.webhook_url:
        problem = await asyncio.to_thread(webhook_url_problem, config.webhook_url, settings.allow_private_webhooks)
        if problem:
            raise Invalid(f"webhook_url: {problem}")
    total = planning.images_total(config)
    if total > settings.max_images_per_job:
        raise Invalid(f"The job asks for {total} images; at most {settings.max_images_per_job} per job.")
    return list(dict.fromkeys(upload_ids))


def _check_reference_count(count: int, settings: Settings, model: GeminiModel) -> None:
    if count > model.max_references:
        raise Invalid(f"Too many reference images: {count}; {model.name} takes at most {model.max_references}.")
    if settings.max_references is not None and count > settings.max_references:
        raise Invalid(
            f"Too many reference images: {count}; at most {settings.max_references} here "
            f"(the service's limit; {model.name} takes up to {model.max_references})."
        )


def _check_params(config: JobConfig, model: GeminiModel) -> None:
    params = config.params
    if params.image_size is not None and params.image_size not in model.image_sizes:
        if not model.image_sizes:
            raise Invalid(
                f"params.image_size: {model.name} does not take image_size; it makes one resolution per aspect ratio."
            )
        raise Invalid(f"params.image_size {params.image_size!r}: {model.name} takes {', '.join(model.image_sizes)}.")
    if params.aspect_ratio is not None and params.aspect_ratio not in model.aspect_ratios:
        raise Invalid(
            f"params.aspect_ratio {params.aspect_ratio!r}: {model.name} takes {', '.join(model.aspect_ratios)}."
        )


async def _check_uploads(
    services: Services,
    project: str,
    config: JobConfig,
    model: GeminiModel,
    upload_ids: list[str],
    record_keys: list[str],
) -> None:
    """What the uploads are, from their records (one MGET, no object read): each of a type the
    model takes, and each Gemini call's body (its references base64-encoded, and the prompt) within
    the model's inline request limit. The create call checks again that the records exist."""
    if not upload_ids:
        return
    raw = await services.redis.mget(record_keys)
    missing = [upload_id for upload_id, value in zip(upload_ids, raw, strict=True) if value is None]
    if missing:
        raise _unknown(missing)
    infos = await _parsed(upload_ids, raw)
    role = "Reference" if isinstance(config, SemiAutoJobRequest) else "Input"
    refused = [upload_id for upload_id, info in infos.items() if f"image/{info.format}" not in model.reference_types]
    if refused:
        formats = sorted({infos[upload_id].format.upper() for upload_id in refused})
        taken = ", ".join(sorted(kind.removeprefix("image/").upper() for kind in model.reference_types))
        raise Invalid(
            f"{role} images of a type {model.name} does not take ({', '.join(formats)}): "
            f"{', '.join(refused[:SHOWN])}. It takes {taken}."
        )
    limit = model.max_request_bytes
    if isinstance(config, SemiAutoJobRequest):
        # Every call carries all the references (repeats too) with one prompt: the longest is the largest.
        prompt = max(config.prompts, key=prompt_bytes)
        size = model.request_bytes(prompt, [infos[upload_id].bytes for upload_id in config.reference_ids])
        if size > limit:
            raise Invalid(
                f"The reference images make each Gemini request {size:,} bytes (sent base64-encoded, with "
                f"the prompt); {model.name} takes at most {limit:,} bytes per request. "
                "Use fewer or smaller reference images."
            )
        return
    # An automatic job's call carries one input with the base prompt.
    fixed = model.request_bytes(config.base_prompt, ())
    oversized = [upload_id for upload_id, info in infos.items() if fixed + reference_bytes(info.bytes) > limit]
    if oversized:
        largest = fixed + reference_bytes(max(infos[upload_id].bytes for upload_id in oversized))
        raise Invalid(
            f"Input images too large for one Gemini request: {', '.join(oversized[:SHOWN])} ({len(oversized)} in "
            f"all). Each is sent base64-encoded with the base prompt; the largest makes a request of {largest:,} "
            f"bytes, and {model.name} takes at most {limit:,} bytes per request."
        )


async def _parsed(upload_ids: list[str], raw: list[str]) -> dict[str, UploadInfo]:
    def parse() -> dict[str, UploadInfo]:
        pairs = zip(upload_ids, raw, strict=True)
        return {upload_id: UploadInfo.model_validate_json(value) for upload_id, value in pairs}

    return parse() if len(raw) <= INLINE_RECORDS else await asyncio.to_thread(parse)
