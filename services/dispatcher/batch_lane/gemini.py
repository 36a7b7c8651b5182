"""Gemini's Batch API and Files API, through google-genai's async client (`client.aio.batches`,
`client.aio.files`): the only module of the batch lane that speaks to Gemini.

Facts used (google-genai 3.6.1, google/genai/batches.py and files.py; the Batch API guide,
https://ai.google.dev/gemini-api/docs/batch-mode): `batches.create(model, src, config)` takes a list
of inline requests or the name of an uploaded JSONL file; `get`, `list` (newest first, paged) and
`cancel` take the batch's name; a batch ends JOB_STATE_SUCCEEDED, FAILED, CANCELLED or EXPIRED (not
done within 48 h); results come inline (`dest.inlined_responses`, in the input's order) or as a
JSONL file (`dest.file_name`) that `files.download(destination=...)` streams to disk.
"""

import io
from pathlib import Path
from typing import Any

from google import genai
from google.genai import errors, types

from shared.settings import Settings

RUNNING_STATES = frozenset({"JOB_STATE_PENDING", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_PAUSED"})
# How far back a look for a batch by its name goes: a batch submitted under a claim is newer than the
# claim, and a claim's submission is retried within the lease.
LOOKUP_PAGE_SIZE = 100
LOOKUP_MAX_PAGES = 20


class GeminiBatchError(Exception):
    """A call to Gemini failed. `retryable`: overload, rate limit, network (try again later);
    otherwise the request itself was refused (`status` says how)."""

    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


def client_for(settings: Settings) -> genai.Client:
    http_options = types.HttpOptions(
        timeout=int(settings.gemini_timeout_seconds * 1000),
        # The lane owns its retries (the next look at the batch); the SDK's own hidden sleeps would
        # hold a lease without anything to show for it.
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    if settings.gemini_base_url:
        http_options.base_url = settings.gemini_base_url
        http_options.api_version = "v1beta"
    return genai.Client(api_key=settings.gemini_api_key.get_secret_value() or None, http_options=http_options)


def _failure(exc: BaseException) -> GeminiBatchError:
    if isinstance(exc, errors.APIError):
        code = exc.code
        # 429: a rate limit or a batch quota; 5xx: Google's side. Both pass.
        retryable = code == 429 or code >= 500
        return GeminiBatchError(f"{code} {exc.status or ''}: {(exc.message or '')[:300]}", code, retryable)
    return GeminiBatchError(f"{type(exc).__name__}: {exc}"[:300], None, True)


class GeminiBatches:
    def __init__(self, client: genai.Client, model: str) -> None:
        self.client = client
        self.model = model

    async def create(self, src: list[types.InlinedRequestDict] | str, display_name: str) -> str:
        try:
            batch = await self.client.aio.batches.create(
                model=self.model, src=src, config=types.CreateBatchJobConfig(display_name=display_name)
            )
        except Exception as exc:
            raise _failure(exc) from exc
        if not batch.name:
            raise GeminiBatchError("Gemini answered a batch without a name", None, True)
        return batch.name

    async def get(self, name: str) -> types.BatchJob:
        try:
            return await self.client.aio.batches.get(name=name)
        except Exception as exc:
            raise _failure(exc) from exc

    async def cancel(self, name: str) -> None:
        try:
            await self.client.aio.batches.cancel(name=name)
        except Exception as exc:
            raise _failure(exc) from exc

    async def find(self, display_name: str, created_after: float) -> str | None:
        """The batch submitted under `display_name`, if Gemini has it: what a submission cut short
        by a crash may have left. Newest first, so the look stops at batches older than the claim."""
        try:
            pager = await self.client.aio.batches.list(config=types.ListBatchJobsConfig(page_size=LOOKUP_PAGE_SIZE))
            seen = 0
            async for batch in pager:
                if batch.display_name == display_name and batch.name:
                    return batch.name
                created = batch.create_time.timestamp() if batch.create_time else None
                seen += 1
                if (
                    created is not None and created < created_after - 60
                ) or seen >= LOOKUP_PAGE_SIZE * LOOKUP_MAX_PAGES:
                    return None
        except Exception as exc:
            raise _failure(exc) from exc
        return None

    async def upload(self, data: bytes, mime_type: str, display_name: str) -> types.File:
        try:
            file = await self.client.aio.files.upload(
                file=io.BytesIO(data), config=types.UploadFileConfig(mime_type=mime_type, display_name=display_name)
            )
        except Exception as exc:
            raise _failure(exc) from exc
        if not file.name or not file.uri:
            raise GeminiBatchError("Gemini answered an upload without a name or uri", None, True)
        return file

    async def upload_path(self, path: Path, mime_type: str, display_name: str) -> str:
        try:
            file = await self.client.aio.files.upload(
                file=str(path), config=types.UploadFileConfig(mime_type=mime_type, display_name=display_name)
            )
        except Exception as exc:
            raise _failure(exc) from exc
        if not file.name:
            raise GeminiBatchError("Gemini answered an upload without a name", None, True)
        return file.name

    async def download(self, file_name: str, destination: Any) -> None:
        """Stream a result file into `destination`, an object with an async `write(chunk)`: never
        whole in memory."""
        try:
            await self.client.aio.files.download(file=file_name, destination=destination)
        except Exception as exc:
            raise _failure(exc) from exc


def state_name(batch: types.BatchJob) -> str:
    state = batch.state
    return str(getattr(state, "value", state) or "")
