"""The Batch API: create, get, list, cancel and delete batch jobs, and their life from PENDING to a final
state, as google-genai 3.6.1 calls them (google/genai/batches.py, the mldev paths).

Wire format (REST reference https://ai.google.dev/api/batch-api; SDK `_create`, `get`, `_list`, `cancel`,
`delete` and the `_…_mldev` converters; answers of the real API as captured in public client tests):
- create: POST /{version}/models/{model}:batchGenerateContent with
  {"batch": {"displayName"?, "inputConfig": {"requests": {"requests": [{"request": GenerateContentRequest,
  "metadata"?: {...}}]}} or {"fileName": "files/…"}}}. The answer is the batch's long-running Operation.
- get GET /{version}/batches/{id}; list GET /{version}/batches?pageSize&pageToken, newest first, as
  {"operations": [...], "nextPageToken"} (`_ListBatchJobsResponse_from_mldev` reads `operations`);
  cancel POST /{version}/batches/{id}:cancel ({}); delete DELETE /{version}/batches/{id} ({}).
- The Operation: {"name": "batches/{id}", "metadata": {"@type": "…v1main.GenerateContentBatch", "model":
  "models/…", "displayName", "inputConfig": {"fileName"} (file batches), "output", "createTime",
  "updateTime", "endTime", "batchStats": {"requestCount", "successfulRequestCount", "failedRequestCount",
  "pendingRequestCount"} (int64, so strings; zeros left out), "state": "BATCH_STATE_…", "name"}, "done": true
  once final, "response": {"@type": "…v1main.GenerateContentBatchOutput", …the output} once SUCCEEDED,
  "error": google.rpc.Status once FAILED, CANCELLED or EXPIRED}. google-genai reads metadata only
  (`_BatchJob_from_mldev`): BATCH_STATE_X becomes JOB_STATE_X (`t_job_state`), metadata.output becomes
  `dest` (responsesFile -> dest.file_name, inlinedResponses.inlinedResponses -> dest.inlined_responses);
  the Operation's `error` is not mapped, so BatchJob.error stays None with this SDK.
- Output of an inline batch: {"inlinedResponses": {"inlinedResponses": [{"response": GenerateContentResponse
  | "error": {"code", "message"}, "metadata": the request's metadata}]}}, in the input order
  (types.BatchJobDestination: "in the same order as the input requests"; InlinedResponse has `metadata`).
- Output of a file batch: {"responsesFile": "files/batch-…"}, a generated JSONL file (files.py) whose
  lines are the input line without its "request", plus "response" or "error": {"key": "k", "response":
  {...}} (batch-api page: "each line is either a GenerateContentResponse or a status object"). The lines come
  in a shuffled order: match them by key.
- A request's `error` is a google.rpc.Status: the gRPC code (3 INVALID_ARGUMENT, 7 PERMISSION_DENIED,
  8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE, …) and the message, what generateContent would have answered.

Life: PENDING for batch_pending_seconds, then RUNNING: the requests are generated in the background, 8 at a
time, each through generation.generate exactly like a generateContent call; after batch_running_seconds
(and once every request has its answer) SUCCEEDED with the output. Not finished batch_expire_seconds after
its creation (48 h by default: the batch-api page), it is EXPIRED, with no output. Cancel moves a
PENDING or RUNNING batch to CANCELLED at once and stops its generation; a finished batch cannot be
cancelled (400 FAILED_PRECONDITION: the stricter reading, Google documents no answer). Delete forgets the
batch (and stops it); its results file stays, as files are separate resources.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web

from deploy.emulators.gemini import errors, responses
from deploy.emulators.gemini.access import api_endpoint, lookup_model, read_body
from deploy.emulators.gemini.catalog import ImageModel
from deploy.emulators.gemini.files import (
    FILES_KEY,
    RESULTS_MIME_TYPE,
    decode_page_token,
    encode_page_token,
    new_id,
    page_size,
    sha256_of,
)
from deploy.emulators.gemini.generation import PARSE_IN_THREAD_BYTES, directives, generate
from deploy.emulators.gemini.request import check_fields, pick, prompt_text
from deploy.emulators.gemini.state import STATE_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")

OPERATION_TYPE: Final = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE: Final = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"
# Requests of one batch generated at the same time.
CONCURRENCY: Final = 8
# Real batch ids: 36 lowercase alphanumerics ("batches/4m855v7q30kc7gtzcigdg9m72o87s08w33vp").
BATCH_ID_LENGTH: Final = 36
BATCH_FIELDS: Final = (
    "name", "model", "displayName", "inputConfig", "output", "createTime", "endTime", "updateTime", "batchStats",
    "state", "priority", "webhookConfig",
)  # fmt: skip
INPUT_CONFIG_FIELDS: Final = ("requests", "fileName")
INLINED_REQUEST_FIELDS: Final = ("request", "metadata")
PENDING, RUNNING = "BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"
SUCCEEDED, FAILED, CANCELLED, EXPIRED = (
    "BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED",
)  # fmt: skip
FINAL_STATES: Final = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED})
# Whole-batch directives: the batch ends in this state, with no output ("xN": only its first N batches).
BATCH_DIRECTIVES: Final = {"batch-expire": EXPIRED, "batch-fail": FAILED}
# The batch's `error` in each final state without output (google.rpc.Status, gRPC codes).
FINAL_ERRORS: Final = {
    FAILED: {"code": errors.GRPC_CODES["INTERNAL"], "message": "The batch failed: an internal error occurred."},
    CANCELLED: {"code": errors.GRPC_CODES["CANCELLED"], "message": "The batch was cancelled."},
    EXPIRED: {
        "code": errors.GRPC_CODES["DEADLINE_EXCEEDED"],
        "message": "The batch expired: it did not finish within its time limit (48 hours).",
    },
}


def job_state(batch_state: str) -> str:
    """What google-genai makes of a state (_transformers.t_job_state): BATCH_STATE_X -> JOB_STATE_X."""
    return "JOB_STATE_" + batch_state.removeprefix("BATCH_STATE_")


@dataclass
class Batch:
    batch_id: str
    seq: int
    model: str
    spec: ImageModel | None
    display_name: str | None
    request_count: int
    # The whole-batch directive that decides its end, if any: EXPIRED or FAILED.
    doomed: str | None
    # Inline batches: the requests until they have run, then their results, by input position.
    requests: list[dict[str, Any]] | None
    # File batches: the input's name, and a private link to its bytes (the input may be deleted meanwhile).
    input_file: str | None
    input_path: Path | None
    # Read from the configuration when the batch is created.
    pending_seconds: float
    running_seconds: float
    expire_seconds: float
    created: float
    created_monotonic: float
    updated: float = 0.0
    ended: float | None = None
    state: str = PENDING
    succeeded: int = 0
    failed: int = 0
    results: list[dict[str, Any] | None] = field(default_factory=list)
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"batches/{self.batch_id}"

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def move(self, state: str) -> None:
        self.state, self.updated = state, time.time()

    def finish(self, state: str, output: dict[str, Any] | None = None) -> None:
        self.state, self.output, self.error = state, output, FINAL_ERRORS.get(state)
        self.updated = self.ended = time.time()
        self.requests = None  # what is left of the input is no longer needed
        if output is None:
            self.results = []  # a batch without output (cancelled, failed, expired) shows none of them

    def stats(self) -> dict[str, str]:
        """BatchStats: int64 counts, so strings; zero counts left out (proto3 JSON)."""
        pending = 0 if self.state == SUCCEEDED else self.request_count - self.succeeded - self.failed
        counts = {
            "requestCount": self.request_count, "successfulRequestCount": self.succeeded,
            "failedRequestCount": self.failed, "pendingRequestCount": pending,
        }  # fmt: skip
        return {key: str(value) for key, value in counts.items() if value}

    def operation(self, *, with_output: bool = True) -> dict[str, Any]:
        meta: dict[str, Any] = {"@type": OPERATION_TYPE, "model": f"models/{self.model}"}
        if self.display_name:
            meta["displayName"] = self.display_name
        if self.input_file:
            meta["inputConfig"] = {"fileName": self.input_file}
        if self.output is not None and with_output:
            meta["output"] = self.output
        meta["createTime"] = responses.timestamp(self.created)
        if self.ended is not None:
            meta["endTime"] = responses.timestamp(self.ended)
        meta["updateTime"] = responses.timestamp(self.updated)
        meta["batchStats"] = self.stats()
        meta["state"] = self.state
        meta["name"] = self.name
        body: dict[str, Any] = {"name": self.name, "metadata": meta}
        if self.final:
            body["done"] = True
        if self.output is not None and with_output:
            body["response"] = {"@type": OUTPUT_TYPE, **self.output}
        if self.error is not None:
            body["error"] = self.error
        return body


class ResultsWriter:
    """A file batch's output lines, appended as they are answered; the offsets of each line are kept so
    the final file can be written in another order without reading it all into memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[tuple[int, int]] = []
        self._lock = asyncio.Lock()

    @staticmethod
    def _append(path: Path, data: bytes) -> int:
        with path.open("ab") as out:
            offset = out.tell()
            out.write(data)
            return offset

    async def append(self, data: bytes) -> None:
        async with self._lock:
            offset = await asyncio.to_thread(self._append, self.path, data)
            self.lines.append((offset, len(data)))

    def write_shuffled(self, destination: Path) -> None:
        """The lines in a random order (run in a thread): the output's order is not the input's, and a
        client that matches lines by position instead of by key finds out in its tests."""
        order = list(self.lines)
        random.shuffle(order)
        with destination.open("wb") as out:
            if not order:
                return
            with self.path.open("rb") as source:
                for offset, length in order:
                    source.seek(offset)
                    out.write(source.read(length))


def scan_input(path: Path) -> tuple[int, list[str]]:
    """A JSONL input's request count (its non-blank lines) and the prompt texts of the lines that carry
    a whole-batch directive. Run in a thread: the file is read line by line, never whole."""
    count = 0
    texts: list[str] = []
    with path.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            count += 1
            if b"[emu:batch-" in line:
                with contextlib.suppress(ValueError):
                    if isinstance(obj := json.loads(line), dict):
                        texts.append(prompt_text(obj.get("request")))
    return count, texts


async def read_lines(path: Path) -> AsyncIterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines, read one at a time in a thread."""
    source = await asyncio.to_thread(path.open, "rb")
    try:
        number = 0
        while line := await asyncio.to_thread(source.readline):
            number += 1
            if line.strip():
                yield number, line
    finally:
        source.close()


async def bounded(items: AsyncIterator[T], work: Callable[[T], Awaitable[None]], concurrency: int) -> None:
    """`work` on every item, at most `concurrency` at a time, taking the items in order."""
    lock = asyncio.Lock()

    async def worker() -> None:
        while True:
            async with lock:
                item = await anext(items, None)
            if item is None:
                return
            await work(item)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
    finally:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


async def _listed(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


class BatchStore:
    """Every batch by id, and the task that moves each through its life."""

    def __init__(self, app: web.Application, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.batches: dict[str, Batch] = {}
        self._seq = 0

    @property
    def work_dir(self) -> Path:
        path = self.app[FILES_KEY].root / "batches"
        path.mkdir(exist_ok=True)
        return path

    def by_state(self) -> dict[str, int]:
        """The batches kept now, by the state google-genai reports (JOB_STATE_…)."""
        return dict(Counter(job_state(batch.state) for batch in self.batches.values()))

    def doom(self, texts: Iterable[str]) -> str | None:
        """The whole-batch directives of this batch's requests. Counted once per batch and prompt text, like
        the counted per-call directives: [emu:batch-expirex1] expires the first batch holding that prompt
        and lets the next identical one through."""
        state = self.app[STATE_KEY]
        doomed = None
        for text in sorted(set(texts)):
            found = directives(text)
            for name, end in BATCH_DIRECTIVES.items():
                if name in found and state.take_hit(name, text, found[name]) and doomed is None:
                    doomed = end
        return doomed

    def add(self, batch: Batch) -> None:
        self.batches[batch.batch_id] = batch
        batch.task = asyncio.create_task(self._live(batch), name=f"gemini-emulator {batch.name}")

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def stop(self, batch: Batch) -> None:
        """Stop the batch's task (its generation with it) and wait until it has stopped."""
        task = batch.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reset(self) -> None:
        batches = list(self.batches.values())
        self.batches.clear()
        for batch in batches:
            await self.stop(batch)

    # --- a batch's life ----------------------------------------------------------------------------------

    async def _live(self, batch: Batch) -> None:
        loop = asyncio.get_running_loop()
        deadline = batch.created_monotonic + batch.expire_seconds
        writer = ResultsWriter(self.work_dir / f"{batch.batch_id}.out.jsonl") if batch.input_path else None
        try:
            await asyncio.sleep(max(0.0, min(batch.created_monotonic + batch.pending_seconds, deadline) - loop.time()))
            if loop.time() >= deadline:
                batch.finish(EXPIRED)
                return
            batch.move(RUNNING)
            running_until = loop.time() + batch.running_seconds
            if batch.doomed is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._run_requests(batch, writer)
                except TimeoutError:
                    batch.finish(EXPIRED)
                    return
            await asyncio.sleep(max(0.0, min(running_until, deadline) - loop.time()))
            if batch.doomed is not None:
                batch.finish(batch.doomed)
            elif loop.time() >= deadline and running_until > deadline:
                batch.finish(EXPIRED)
            else:
                batch.finish(SUCCEEDED, await self._output(batch, writer))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s broke", batch.name)
            batch.finish(FAILED)
        finally:
            if batch.input_path is not None:
                batch.input_path.unlink(missing_ok=True)
            if writer is not None:
                writer.path.unlink(missing_ok=True)

    async def _run_requests(self, batch: Batch, writer: ResultsWriter | None) -> None:
        if batch.requests is not None:
            batch.results = [None] * len(batch.requests)

            async def inline(item: tuple[int, dict[str, Any]]) -> None:
                index, entry = item
                result = await self._answer(batch, entry["request"])
                if "metadata" in entry:
                    result["metadata"] = entry["metadata"]
                batch.results[index] = result

            await bounded(_listed(enumerate(batch.requests)), inline, CONCURRENCY)
        elif batch.input_path is not None and writer is not None:

            async def line(item: tuple[int, bytes]) -> None:
                await writer.append(await self._answer_line(batch, *item))

            await bounded(read_lines(batch.input_path), line, CONCURRENCY)

    async def _answer_line(self, batch: Batch, number: int, line: bytes) -> bytes:
        """One input line's output line: the line without its "request", plus "response" or "error"."""
        try:
            obj = await asyncio.to_thread(json.loads, line) if len(line) > PARSE_IN_THREAD_BYTES else json.loads(line)
        except ValueError as exc:
            out: dict[str, Any] = self._refused(batch, errors.invalid_argument(f"Line {number} is not JSON: {exc}"))
        else:
            if not isinstance(obj, dict) or not isinstance(obj.get("request"), dict):
                problem = errors.invalid_argument(
                    f'Line {number} must be a JSON object with a "request" (a GenerateContentRequest object).'
                )
                out = {k: v for k, v in obj.items() if k != "request"} if isinstance(obj, dict) else {}
                out.update(self._refused(batch, problem))
            else:
                out = {k: v for k, v in obj.items() if k != "request"}
                out.update(await self._answer(batch, obj["request"]))
        text = await asyncio.to_thread(json.dumps, out) if len(line) > PARSE_IN_THREAD_BYTES else json.dumps(out)
        return text.encode() + b"\n"

    async def _answer(self, batch: Batch, request: Any) -> dict[str, Any]:
        """{"response": …} or {"error": …} for one request, generated like a generateContent call."""
        state = self.app[STATE_KEY]
        try:
            if not isinstance(request, dict):
                raise errors.invalid_argument("The request must be a GenerateContentRequest object.")
            model = pick(request, "model")
            if model is not None and str(model).removeprefix("models/") != batch.model:
                raise errors.invalid_argument(
                    f"The request's model ({model}) is not the batch's (models/{batch.model}).", "model"
                )
            response = await generate(self.app, request, batch.model, batch.spec, in_batch=True)
        except errors.ApiError as error:
            return self._refused(batch, error)
        batch.succeeded += 1
        state.batch_requests += 1
        batch.updated = time.time()
        return {"response": response}

    def _refused(self, batch: Batch, error: errors.ApiError) -> dict[str, Any]:
        state = self.app[STATE_KEY]
        batch.failed += 1
        state.batch_requests += 1
        state.batch_request_errors[error.kind] += 1
        batch.updated = time.time()
        return {"error": error.status_proto()}

    async def _output(self, batch: Batch, writer: ResultsWriter | None) -> dict[str, Any]:
        if writer is None:
            return {"inlinedResponses": {"inlinedResponses": batch.results}}
        files = self.app[FILES_KEY]
        file_id = f"batch-{new_id(16)}"
        destination = files.path_for(file_id)
        await asyncio.to_thread(writer.write_shuffled, destination)
        size = destination.stat().st_size
        digest = await asyncio.to_thread(sha256_of, destination)
        files.add(file_id, RESULTS_MIME_TYPE, size, digest, "GENERATED", f"{batch.name} results")
        return {"responsesFile": f"files/{file_id}"}


BATCHES_KEY: web.AppKey[BatchStore] = web.AppKey("batches", BatchStore)


# --- routes ----------------------------------------------------------------------------------------------


def _inline_requests(requests: Any) -> list[dict[str, Any]]:
    at = "batch.input_config.requests"
    container = check_fields(requests, ("requests",), at, "InlinedRequests")
    items = pick(container, "requests")
    if not isinstance(items, list) or not items:
        raise errors.invalid_argument(f"* BatchGenerateContentRequest.{at}.requests: must not be empty\n", at)
    checked = []
    for i, item in enumerate(items):
        item_at = f"{at}.requests[{i}]"
        check_fields(item, INLINED_REQUEST_FIELDS, item_at, "InlinedRequest")
        request = pick(item, "request")
        if not isinstance(request, dict):
            raise errors.invalid_argument(
                f"* BatchGenerateContentRequest.{item_at}.request: request is required\n", f"{item_at}.request"
            )
        entry: dict[str, Any] = {"request": request}
        if (metadata := pick(item, "metadata")) is not None:
            if not isinstance(metadata, dict):
                raise errors.invalid_argument(
                    f"Invalid value at '{item_at}.metadata' (type.googleapis.com/google.protobuf.Struct), "
                    f"{json.dumps(metadata)[:100]}",
                    f"{item_at}.metadata",
                )
            entry["metadata"] = metadata
        checked.append(entry)
    return checked


def _priority(value: Any) -> None:
    """batch.priority is an int64: a number or a string of digits."""
    if value is None:
        return
    text = str(value)
    if isinstance(value, bool) or not text.lstrip("-").isdigit():
        raise errors.invalid_argument(
            f"Invalid value at 'batch.priority' (TYPE_INT64), {json.dumps(value)}", "batch.priority"
        )


async def _create(request: web.Request) -> web.StreamResponse:
    store = request.app[BATCHES_KEY]
    state = request.app[STATE_KEY]
    version = request.match_info["version"]
    model = request.match_info["tail"].partition(":")[0]
    spec = lookup_model(model, version, "batchGenerateContent")
    raw = await read_body(request, store.max_request_bytes)
    try:
        body = await asyncio.to_thread(json.loads, raw) if len(raw) > PARSE_IN_THREAD_BYTES else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise errors.invalid_argument(f"Invalid JSON payload received. {exc}") from None
    check_fields(body, ("batch",), "", "BatchGenerateContentRequest")
    if pick(body, "batch") is None:
        raise errors.invalid_argument("* BatchGenerateContentRequest.batch: batch is required\n", "batch")
    spec_batch = check_fields(pick(body, "batch"), BATCH_FIELDS, "batch", "GenerateContentBatch")
    if (named := pick(spec_batch, "model")) is not None and str(named).removeprefix("models/") != model:
        raise errors.invalid_argument(f"batch.model ({named}) differs from the model in the URL.", "batch.model")
    display_name = pick(spec_batch, "displayName")
    if display_name is not None and not isinstance(display_name, str):
        raise errors.invalid_argument(
            f"Invalid value at 'batch.display_name' (TYPE_STRING), {json.dumps(display_name)[:100]}",
            "batch.display_name",
        )
    _priority(pick(spec_batch, "priority"))
    if pick(spec_batch, "inputConfig") is None:
        raise errors.invalid_argument(
            "* BatchGenerateContentRequest.batch.input_config: input_config is required\n", "batch.input_config"
        )
    input_config = check_fields(
        pick(spec_batch, "inputConfig"), INPUT_CONFIG_FIELDS, "batch.input_config", "InputConfig"
    )
    inline, file_name = pick(input_config, "requests"), pick(input_config, "fileName")
    if (inline is None) == (file_name is None):
        raise errors.invalid_argument(
            "batch.input_config must set exactly one of requests (inline) and file_name.", "batch.input_config"
        )

    batch_id = new_id(BATCH_ID_LENGTH)
    requests: list[dict[str, Any]] | None = None
    input_path: Path | None = None
    if inline is not None:
        requests = _inline_requests(inline)
        count, texts = len(requests), [prompt_text(entry["request"]) for entry in requests]
    else:
        if not isinstance(file_name, str):
            raise errors.invalid_argument("batch.input_config.file_name must be a string.", "batch.input_config")
        stored = request.app[FILES_KEY].open_input(file_name)
        # A private link to the input's bytes: the batch keeps them even if the file is deleted or expires.
        input_path = store.work_dir / f"{batch_id}.in.jsonl"
        try:
            await asyncio.to_thread(os.link, stored.path, input_path)
        except OSError:
            await asyncio.to_thread(shutil.copyfile, stored.path, input_path)
        count, texts = await asyncio.to_thread(scan_input, input_path)
        if count == 0:
            input_path.unlink(missing_ok=True)
            raise errors.invalid_argument(f"The input file {file_name} holds no requests.", "batch.input_config")

    config = state.config
    now = time.time()
    batch = Batch(
        batch_id=batch_id, seq=store.next_seq(), model=model, spec=spec, display_name=display_name or None,
        request_count=count, doomed=store.doom(texts), requests=requests, input_file=file_name,
        input_path=input_path, pending_seconds=config.batch_pending_seconds,
        running_seconds=config.batch_running_seconds, expire_seconds=config.batch_expire_seconds, created=now,
        created_monotonic=asyncio.get_running_loop().time(), updated=now,
    )  # fmt: skip
    store.add(batch)
    state.batches_created += 1
    return web.json_response(batch.operation())


def _batch(request: web.Request, batch_id: str) -> Batch:
    batch = request.app[BATCHES_KEY].batches.get(batch_id)
    if batch is None:
        raise errors.not_found(f"batches/{batch_id}")
    return batch


async def _get(request: web.Request) -> web.StreamResponse:
    batch = _batch(request, request.match_info["tail"])
    body = batch.operation()
    # A finished inline batch carries every answer (twice: metadata.output and response): encode it off the loop.
    text = await asyncio.to_thread(json.dumps, body) if batch.output is not None else json.dumps(body)
    return web.Response(text=text, content_type="application/json")


async def _list(request: web.Request) -> web.StreamResponse:
    """Newest first. Each batch without its output (get a batch to read it): a page of finished inline
    batches would otherwise carry every image of every batch."""
    store = request.app[BATCHES_KEY]
    size = page_size(request)
    below = decode_page_token(request)
    ordered = sorted(store.batches.values(), key=lambda b: b.seq, reverse=True)
    remaining = [b for b in ordered if below is None or b.seq < below]
    page = remaining[:size]
    body: dict[str, Any] = {}
    if page:
        body["operations"] = [b.operation(with_output=False) for b in page]
    if len(remaining) > size:
        body["nextPageToken"] = encode_page_token(page[-1].seq)
    return web.json_response(body)


async def _cancel(request: web.Request) -> web.StreamResponse:
    batch_id, _, method = request.match_info["tail"].partition(":")
    if method != "cancel":
        raise errors.method_not_found(request.match_info["version"], method or request.match_info["tail"])
    batch = _batch(request, batch_id)
    if batch.final:
        raise errors.failed_precondition(
            f"{batch.name} is already finished ({batch.state}); only a pending or running batch can be cancelled."
        )
    await request.app[BATCHES_KEY].stop(batch)
    if not batch.final:
        batch.finish(CANCELLED)
    return web.json_response({})


async def _delete(request: web.Request) -> web.StreamResponse:
    store = request.app[BATCHES_KEY]
    batch = _batch(request, request.match_info["tail"])
    store.batches.pop(batch.batch_id, None)
    await store.stop(batch)
    return web.json_response({})


create = api_endpoint(_create)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/{version}/batches", api_endpoint(_list))
    app.router.add_get("/{version}/batches/{tail}", api_endpoint(_get))
    app.router.add_post("/{version}/batches/{tail}", api_endpoint(_cancel))
    app.router.add_delete("/{version}/batches/{tail}", api_endpoint(_delete))
