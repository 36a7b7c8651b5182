"""Check what a worker reports about its images before it becomes the state of record.

A result reaches the dispatcher from RunPod's webhook (anyone holding the run's token can post
one) or from /status. Trusted as it came, a lying or broken worker could record successes for
images never written (the packager then fails its CRC check for good), or negative token counts
that subtract from a project's figures. So each image's outcome is refused unless it is well
formed and within the operator's limits, and each claimed success must match the object the
worker was given a link for: it exists, with the claimed size and CRC-32. A refused image fails
with a reason instead of blocking its job.

Objects are streamed (256 KiB chunks, a bounded number at once per process), never held whole.
Object storage being unreachable is not the worker's fault: it raises, so the stream message is
delivered again later instead of failing images.
"""

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from shared import keys
from shared.models import ImageOutcome, ImageStatus
from shared.planning import EXTENSIONS
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.records import ClaimedRun, ImageRecord

# The error of an image whose reported outcome was malformed or out of bounds.
INVALID_RESULT = "invalid_result"
# The error of an image reported as stored whose object is missing or differs from the report.
OBJECT_MISMATCH = "object_mismatch"
_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class Refused:
    """An image outcome that could not be read or is out of bounds: why, for its record."""

    detail: str


def parse_outcomes(output: Any, settings: Settings) -> dict[int, ImageOutcome | Refused]:
    """The worker's outcome per image index: valid ones, and refusals for those that are not.

    Entries without a usable index cannot be attributed to an image and are skipped (their slot
    then counts as missing). An index reported twice is refused: which of the two is true?
    """
    outcomes: dict[int, ImageOutcome | Refused] = {}
    images = output.get("images") if isinstance(output, dict) else None
    if not isinstance(images, list):
        return outcomes
    for raw in images:
        index = raw.get("index") if isinstance(raw, dict) else None
        if type(index) is not int or index < 0:
            continue
        if index in outcomes:
            outcomes[index] = Refused("the worker reported this image more than once")
            continue
        try:
            outcome = ImageOutcome.model_validate(raw)
        except ValidationError as exc:
            outcomes[index] = Refused(_describe(exc))
            continue
        problem = _out_of_bounds(outcome, settings)
        outcomes[index] = outcome if problem is None else Refused(problem)
    return outcomes


def _describe(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or 'outcome'}: {e['msg']}" for e in exc.errors(include_url=False)]
    return ("malformed outcome: " + "; ".join(parts))[:_DETAIL_CHARS]


def _out_of_bounds(outcome: ImageOutcome, settings: Settings) -> str | None:
    limit = settings.max_result_tokens
    for name in ("prompt_tokens", "output_tokens"):
        if getattr(outcome, name) > limit:
            return f"{name} {getattr(outcome, name)} is above the limit of {limit}"
    if outcome.status != "succeeded":
        return None
    if outcome.mime_type not in EXTENSIONS:
        return f"mime_type {str(outcome.mime_type)[:50]!r} is not one of {', '.join(sorted(EXTENSIONS))}"
    if outcome.bytes is None or outcome.crc32 is None:
        return "a stored image needs its bytes and crc32"
    if outcome.bytes > settings.max_result_image_bytes:
        return f"bytes {outcome.bytes} is above the limit of {settings.max_result_image_bytes}"
    return None


class ResultVerifier:
    """Compares claimed successes with their stored objects, `result_verify_concurrency` at a time."""

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage = storage
        self.gate = asyncio.Semaphore(settings.result_verify_concurrency)

    async def mismatch(self, key: str, size: int, crc32: int) -> str | None:
        """What differs between the object at `key` and the claim (None: it matches).

        Raises when object storage cannot answer: that says nothing about the image."""
        async with self.gate:
            # Stops within a chunk past the claimed size: a huge object costs no more than its claim.
            found = await self.storage.checksum(key, limit=size)
        if found is None:
            return "no image was stored for this result"
        stored_size, stored_crc = found
        if stored_size != size:
            stored = f"more than {size}" if stored_size > size else str(stored_size)
            return f"the stored image has {stored} bytes, the worker reported {size}"
        if stored_crc != crc32:
            return f"the stored image has CRC-32 {stored_crc:08x}, the worker reported {crc32:08x}"
        return None

    async def records(
        self, run: ClaimedRun, slots: list[int], outcomes: Mapping[int, ImageOutcome | Refused]
    ) -> dict[int, ImageRecord]:
        """The image records of a run's slots from what its worker reported, every success checked
        against the object of that claim (never another execution's)."""
        run_id, attempt, claim = run
        now = time.time()
        claimed = {
            index: outcome
            for index in slots
            if isinstance(outcome := outcomes.get(index), ImageOutcome) and outcome.status == "succeeded"
        }
        checks = [
            self.mismatch(keys.image_object(run_id, index, attempt, claim), outcome.bytes or 0, outcome.crc32 or 0)
            for index, outcome in claimed.items()
        ]
        mismatches = dict(zip(claimed, await asyncio.gather(*checks), strict=True))
        records: dict[int, ImageRecord] = {}
        for index in slots:
            outcome = outcomes.get(index)
            if outcome is None:
                records[index] = _failed(attempt, now, "missing_output", "the worker returned no result for this image")
            elif isinstance(outcome, Refused):
                # Its token counts are not taken either: a worker that lies about one field may about all.
                records[index] = _failed(attempt, now, INVALID_RESULT, outcome.detail)
            elif outcome.status != "succeeded":
                records[index] = ImageRecord(
                    status=ImageStatus.FAILED,
                    attempt=attempt,
                    error=outcome.error or "upstream_error",
                    detail=outcome.detail,
                    prompt_tokens=outcome.prompt_tokens,
                    finished_at=now,
                )
            elif (problem := mismatches[index]) is not None:
                # The counts passed their bounds: the image was most likely generated (and paid for)
                # and lost on its way to storage, so they are kept.
                record = _failed(attempt, now, OBJECT_MISMATCH, problem)
                records[index] = record.model_copy(
                    update={"prompt_tokens": outcome.prompt_tokens, "output_tokens": outcome.output_tokens}
                )
            else:
                records[index] = ImageRecord(
                    status=ImageStatus.SUCCEEDED,
                    attempt=attempt,
                    object_key=keys.image_object(run_id, index, attempt, claim),
                    mime_type=outcome.mime_type,
                    bytes=outcome.bytes,
                    crc32=outcome.crc32,
                    prompt_tokens=outcome.prompt_tokens,
                    output_tokens=outcome.output_tokens,
                    finished_at=now,
                )
        return records


def _failed(attempt: int, now: float, error: str, detail: str) -> ImageRecord:
    return ImageRecord(status=ImageStatus.FAILED, attempt=attempt, error=error, detail=detail, finished_at=now)
