"""A finished batch's answers, image by image: each image stored in object storage under the same
keys and recorded the same way as the realtime lane's (shared/stores/records.ImageRecord), each
failure with its reason.

The classes are the worker's (worker/failures.py, which runs on RunPod and cannot be imported
here): the finish reasons of a refusal are final (`safety_blocked`), an answer without an image is
`no_image`, a request Gemini refused is `bad_request` (4xx) or `upstream_error` (5xx). Gemini 3
sends interim thought images before the final one: the last image not marked `thought` counts.
"""

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence

from google.genai import types
from pydantic import BaseModel, ConfigDict

from shared import checksums, keys
from shared.models import ImageStatus
from shared.storage import Storage
from shared.stores.records import ClaimedRun, ImageRecord

REFUSAL_FINISH_REASONS = frozenset(
    {
        "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII",
        "IMAGE_RECITATION", "RECITATION",
    }
)  # fmt: skip
DETAIL_MAX_CHARS = 300
# Images stored at once while a batch's answers are read.
STORE_CONCURRENCY = 8
# One answer of a result file: an image of the largest size, base64, with its JSON (Gemini's answers
# are a few MB; a line past this is not an answer).
MAX_LINE_BYTES = 64 * 1024 * 1024


class ResultLine(BaseModel):
    """One line of a batch's JSONL result file (Batch API guide): the request's key, and its
    response or its error."""

    model_config = ConfigDict(extra="ignore")

    key: str
    response: types.GenerateContentResponse | None = None
    error: dict[str, object] | None = None


def _name(value: object) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def _short(text: str) -> str:
    return text if len(text) <= DETAIL_MAX_CHARS else text[: DETAIL_MAX_CHARS - 1] + "…"


def _tokens(response: types.GenerateContentResponse) -> tuple[int, int]:
    usage = response.usage_metadata
    if usage is None:
        return 0, 0
    return usage.prompt_token_count or 0, (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)


# Errors inside a batch's answers carry gRPC codes (google.rpc.Code), not HTTP statuses.
GRPC_REASONS = {
    3: "bad_request",  # INVALID_ARGUMENT
    5: "bad_request",  # NOT_FOUND (a file the request names)
    9: "bad_request",  # FAILED_PRECONDITION
    11: "bad_request",  # OUT_OF_RANGE
    7: "auth_failed",  # PERMISSION_DENIED
    16: "auth_failed",  # UNAUTHENTICATED
    8: "rate_limited",  # RESOURCE_EXHAUSTED
}


def error_reason(code: object) -> str:
    """The failure class of an answer's error: its gRPC code, or an HTTP status where one is given."""
    number = code if isinstance(code, int) else 0
    if number < 100:
        return GRPC_REASONS.get(number, "upstream_error")  # 4, 13, 14: deadline, internal, unavailable
    if number in (401, 403):
        return "auth_failed"
    if number == 429:
        return "rate_limited"
    if 400 <= number < 500:
        return "bad_request"
    return "upstream_error"


class OutcomeWriter:
    """Turns a batch's answers into image records for one claim of one run."""

    def __init__(self, storage: Storage, run: ClaimedRun) -> None:
        self.storage = storage
        self.run = run
        self._gate = asyncio.Semaphore(STORE_CONCURRENCY)

    def failed(self, error: str, detail: str, prompt_tokens: int = 0, output_tokens: int = 0) -> ImageRecord:
        return ImageRecord(
            status=ImageStatus.FAILED,
            attempt=self.run.attempt,
            error=error,
            detail=_short(detail),
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            finished_at=time.time(),
        )

    async def from_error(self, error: object) -> ImageRecord:
        if isinstance(error, types.JobError):
            code, message = error.code, error.message
        elif isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        else:
            code, message = None, str(error)
        return self.failed(error_reason(code), f"Gemini refused the request ({code}): {message or 'no message'}")

    async def from_response(self, index: int, response: types.GenerateContentResponse) -> ImageRecord:
        prompt_tokens, output_tokens = _tokens(response)
        parts = response.parts or []
        images = [part for part in parts if part.inline_data is not None and part.inline_data.data]
        final = [part for part in images if not part.thought]
        if final:
            inline = final[-1].inline_data
            assert inline is not None and inline.data is not None
            return await self._store(index, inline.data, inline.mime_type or "image/png", prompt_tokens, output_tokens)
        feedback = response.prompt_feedback
        block = _name(feedback.block_reason) if feedback else None
        if block:
            return self.failed("safety_blocked", f"prompt blocked: {block}", prompt_tokens, output_tokens)
        candidate = response.candidates[0] if response.candidates else None
        finish = _name(candidate.finish_reason) if candidate else None
        if finish in REFUSAL_FINISH_REASONS:
            return self.failed("safety_blocked", f"finish reason {finish}", prompt_tokens, output_tokens)
        what = "only interim thought images, no final image" if images else "no image in response"
        return self.failed("no_image", f"{what} (finish reason {finish or 'none'})", prompt_tokens, output_tokens)

    async def _store(
        self, index: int, data: bytes, mime_type: str, prompt_tokens: int, output_tokens: int
    ) -> ImageRecord:
        run_id, attempt, claim = self.run
        key = keys.image_object(run_id, index, attempt, claim)
        async with self._gate:
            await self.storage.put_bytes(key, data, mime_type)
        return ImageRecord(
            status=ImageStatus.SUCCEEDED,
            attempt=attempt,
            object_key=key,
            mime_type=mime_type,
            bytes=len(data),
            crc32=checksums.crc32(data),
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            finished_at=time.time(),
        )

    async def from_inline(
        self, slots: Sequence[int], responses: Sequence[types.InlinedResponse]
    ) -> dict[int, ImageRecord]:
        """Inline answers, matched by the `key` each request carried in its metadata (the docs
        promise the input's order, and newer SDKs re-sort: the key is what holds); by position when
        no key came back."""
        by_key = {(answer.metadata or {}).get("key"): answer for answer in responses}
        keyed = None not in by_key
        records: dict[int, ImageRecord] = {}

        async def one(position: int, index: int) -> None:
            answer = by_key.get(str(index)) if keyed else (responses[position] if position < len(responses) else None)
            if answer is None:
                records[index] = self.failed("upstream_error", "the batch gave no answer for this request")
            elif answer.response is not None:
                records[index] = await self.from_response(index, answer.response)
            else:
                records[index] = await self.from_error(answer.error)

        await asyncio.gather(*(one(position, index) for position, index in enumerate(slots)))
        return records

    async def from_download(
        self, slots: Sequence[int], download: Callable[["ResultSink"], Awaitable[None]]
    ) -> dict[int, ImageRecord]:
        """A JSONL result file, handled line by line as it downloads: memory holds the lines being
        stored (up to STORE_CONCURRENCY answers), never the file (250 images are some 500 MB)."""
        wanted = {str(index): index for index in slots}
        records: dict[int, ImageRecord] = {}
        pending: set[asyncio.Task[None]] = set()
        started: list[asyncio.Task[None]] = []  # each raises, if it failed, once all are done

        async def one(line: ResultLine) -> None:
            index = wanted[line.key]
            if line.response is not None:
                records[index] = await self.from_response(index, line.response)
            else:
                records[index] = await self.from_error(line.error or {"message": "neither response nor error"})

        async def handle(text: bytes) -> None:
            if not text.strip():
                return
            line = _parse(text)
            if line.key not in wanted or wanted[line.key] in records:
                return  # not one of this batch's requests, or a duplicate: the first answer counts
            # Taken now, so a duplicate later in the file is skipped even while this one is stored.
            records[wanted[line.key]] = self.failed("upstream_error", "being stored")
            task = asyncio.create_task(one(line))
            started.append(task)
            pending.add(task)
            task.add_done_callback(pending.discard)
            if len(pending) >= STORE_CONCURRENCY:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

        sink = ResultSink(handle)
        try:
            await download(sink)
            await sink.close()
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for task in started:
            task.result()  # an image not stored (storage down): the whole look is tried again
        for index in slots:
            if index not in records:
                records[index] = self.failed("upstream_error", "the batch's result file has no answer for this request")
        return records


class ResultSink:
    """A writable stream for google-genai's `files.download(destination=...)`, which awaits each
    write (google/genai/_api_client.py async_download_file): each complete line is handed on as it
    arrives, so a download waits while its answers are stored."""

    def __init__(self, handle: Callable[[bytes], Awaitable[None]]) -> None:
        self._handle = handle
        self._buffer = bytearray()
        self._searched = 0

    async def write(self, chunk: bytes) -> int:
        self._buffer += chunk
        while (end := self._buffer.find(b"\n", self._searched)) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._searched = 0
            await self._handle(line)
        self._searched = len(self._buffer)
        if len(self._buffer) > MAX_LINE_BYTES:
            raise ValueError(f"a result line longer than {MAX_LINE_BYTES} bytes")
        return len(chunk)

    async def close(self) -> None:
        if self._buffer:
            line, self._buffer = bytes(self._buffer), bytearray()
            await self._handle(line)


def _parse(text: bytes) -> ResultLine:
    try:
        return ResultLine.model_validate_json(text)
    except ValueError:
        try:
            key = str(json.loads(text).get("key", ""))
        except (ValueError, AttributeError):
            key = ""
        return ResultLine(key=key, error={"code": 500, "message": "an answer Bunch could not read"})
