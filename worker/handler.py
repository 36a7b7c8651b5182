"""RunPod Serverless handler: generate a run's images with Gemini and PUT them to presigned URLs.

Run by RunPod as `python handler.py`; the payload contract mirrors shared.models.RunInput/ImageOutcome,
restated here because the worker image ships without the `shared` package.

A run with `limits` ends within limits.budget_seconds of the handler starting (run_control.Deadline);
an answer meaning every call would fail (daily quota, bad key) stops the run's other items
(run_control.RunBreaker). Failure classes: failures.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from gemini_client import ImageResult, Reference, backoff_delay, generate_image
from pydantic import BaseModel
from run_control import Deadline, RunBreaker
from worker_settings import RunLimits, WorkerSettings, check_fitness

log = logging.getLogger("bunch.worker")


class Params(BaseModel):
    aspect_ratio: str | None = None
    image_size: str | None = None


class Item(BaseModel):
    index: int
    prompt: str
    reference_urls: list[str] = []
    output_url: str


class RunInput(BaseModel):
    task: Literal["semi_auto_generation", "automatic_generation"]
    job_id: str
    run_id: str
    attempt: int = 1
    model: str
    params: Params = Params()
    items: list[Item]
    # Older dispatchers send none: the environment's settings apply and there is no run deadline.
    limits: RunLimits | None = None


class TransferError(RuntimeError):
    """A reference download or output upload failed for good: the run fails and the dispatcher retries it."""


TRANSFER_TIMEOUT_SECONDS = 120.0
TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT_SECONDS, connect=15)


def _where(url: str) -> str:
    """A URL without its query: presigned URLs carry credentials in the query string."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def sniff_mime(data: bytes, declared: str | None) -> str:
    """The image type from magic bytes: object stores often answer application/octet-stream."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "image/heic"
    if declared and declared.startswith("image/"):
        return declared.split(";")[0].strip()
    return "image/png"


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """RunPod reports str(exception): surface the real cause, not "unhandled errors in a TaskGroup"."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def _transfer(
    session: aiohttp.ClientSession,
    settings: WorkerSettings,
    deadline: Deadline,
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[bytes, str | None]:
    """One HTTP exchange retried on connection errors, timeouts, 429 and 5xx; other statuses fail at once.

    Each attempt ends at the run's deadline, and no retry is started whose wait would pass it."""
    last_error = ""
    for attempt in range(1, settings.transfer_max_attempts + 1):
        timeout = deadline.cap(TRANSFER_TIMEOUT_SECONDS)
        if timeout <= 0:
            last_error = f"not attempted: {deadline.describe()} was used up"
            break
        try:
            async with asyncio.timeout(timeout), session.request(method, url, data=data, headers=headers) as resp:
                body = await resp.read()
                if resp.status < 300:
                    return body, resp.headers.get("Content-Type")
                last_error = f"HTTP {resp.status}"
                if resp.status != 429 and resp.status < 500:
                    break
        except TimeoutError:
            last_error = f"timed out after {timeout:.3g} s"
        except aiohttp.ClientError as exc:
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            last_error = last_error.replace(url, _where(url))
        if attempt < settings.transfer_max_attempts:
            delay = backoff_delay(attempt, 0.5, settings.transfer_backoff_max_seconds)
            if not deadline.allows(delay):
                last_error += f"; {deadline.describe()} leaves no room for another attempt"
                break
            await asyncio.sleep(delay)
    raise TransferError(f"{method} {_where(url)} failed: {last_error}")


async def download_references(
    session: aiohttp.ClientSession, settings: WorkerSettings, deadline: Deadline, urls: list[str]
) -> dict[str, Reference]:
    async def fetch(url: str) -> tuple[str, Reference]:
        data, content_type = await _transfer(session, settings, deadline, "GET", url)
        return url, Reference(data=data, mime_type=sniff_mime(data, content_type))

    try:
        # A TaskGroup stops the other downloads once one fails for good: the run is lost anyway.
        async with asyncio.TaskGroup() as group:
            # dict.fromkeys dedupes while keeping order: a reference shared by many items is fetched once.
            tasks = [group.create_task(fetch(url)) for url in dict.fromkeys(urls)]
    except ExceptionGroup as eg:
        raise _first_error(eg) from eg
    return dict(task.result() for task in tasks)


def _outcome(index: int, result: ImageResult) -> dict[str, Any]:
    return {
        "index": index,
        "status": "succeeded" if result.ok else "failed",
        "error": result.error,
        "detail": result.detail,
        "mime_type": result.mime_type,
        "bytes": len(result.data) if result.data is not None else None,
        # Lets the packager write the ZIP entry without reading the object twice.
        "crc32": zlib.crc32(result.data) if result.data is not None else None,
        "prompt_tokens": result.prompt_tokens,
        "output_tokens": result.output_tokens,
    }


@dataclass(frozen=True)
class RunContext:
    """What every item of one run shares."""

    run: RunInput
    settings: WorkerSettings
    session: aiohttp.ClientSession
    deadline: Deadline
    breaker: RunBreaker
    gate: asyncio.Semaphore


async def process_item(ctx: RunContext, item: Item, references: dict[str, Reference]) -> dict[str, Any]:
    run = ctx.run
    async with ctx.gate:
        result = await generate_image(
            ctx.settings,
            run.model,
            item.prompt,
            [references[url] for url in item.reference_urls],
            aspect_ratio=run.params.aspect_ratio,
            image_size=run.params.image_size,
            deadline=ctx.deadline,
            breaker=ctx.breaker,
        )
    if result.ok and result.data is not None:
        mime_type = result.mime_type or "image/png"
        # Raises TransferError: an image we paid for but could not store must fail the run, not vanish.
        await _transfer(
            ctx.session, ctx.settings, ctx.deadline, "PUT", item.output_url,
            data=result.data, headers={"Content-Type": mime_type},
        )  # fmt: skip
    else:
        log.info("run %s item %d failed: %s (%s)", run.run_id, item.index, result.error, result.detail)
    return _outcome(item.index, result)


async def run_items(run: RunInput, settings: WorkerSettings, deadline: Deadline) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=TRANSFER_TIMEOUT) as session:
        # A fresh breaker per run: the next run may come after an operator fixed the key or the quota.
        ctx = RunContext(run, settings, session, deadline, RunBreaker(), asyncio.Semaphore(settings.max_parallel_calls))
        references = await download_references(
            session, settings, deadline, [url for item in run.items for url in item.reference_urls]
        )
        try:
            # A TaskGroup cancels the sibling calls as soon as one upload fails: the run is lost anyway.
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(process_item(ctx, item, references)) for item in run.items]
        except ExceptionGroup as eg:
            raise _first_error(eg) from eg
    return sorted((task.result() for task in tasks), key=lambda outcome: int(outcome["index"]))


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    run = RunInput.model_validate(job["input"])
    settings = WorkerSettings.from_env().with_limits(run.limits)
    # The budget counts from the handler's start: validation and settings are part of the run too.
    deadline = Deadline(run.limits.budget_seconds if run.limits else None, started=started)
    # The dispatcher writes the full prompt (base prompt + variation) for automatic runs and Gemini samples
    # a fresh image per call, so both tasks are served identically; the prompt is not rewritten here.
    log.info(
        "run %s (job %s, attempt %d, %s): %d items",
        run.run_id, run.job_id, run.attempt, run.task, len(run.items),
    )  # fmt: skip
    images = await run_items(run, settings, deadline)
    succeeded = sum(1 for image in images if image["status"] == "succeeded")
    log.info("run %s done: %d/%d images succeeded", run.run_id, succeeded, len(images))
    return {"images": images}


def concurrency_modifier(current_concurrency: int) -> int:
    """How many jobs RunPod may hand this worker at once (WORKER_CONCURRENCY)."""
    return WorkerSettings.from_env().concurrency


if __name__ == "__main__":
    import runpod

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Runs only on real RunPod (RUNPOD_WEBHOOK_GET_JOB set), before the first job: a worker without a
    # key or with a malformed setting exits instead of failing every run it takes.
    runpod.serverless.register_fitness_check(check_fitness)
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})
