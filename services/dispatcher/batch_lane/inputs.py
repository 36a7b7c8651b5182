"""A batch's input: one generateContent request per image slot, inline in the create call or, past
the inline bounds, as a JSONL file in the Files API. References go once per job to the Files API
and every request names them by URI, so a reference used by a thousand requests is sent once
instead of a thousand times (the realtime lane sends it with every call).

Wire forms: inline requests as google-genai's InlinedRequest (contents, config, metadata), JSONL
lines as the Batch API guide gives them, `{"key": ..., "request": GenerateContentRequest}`,
references as `file_data {file_uri, mime_type}` parts. One spelling for both: the JSONL request is
proto3 JSON, whose parsers accept the fields' original snake_case names as well as lowerCamelCase
(protobuf.dev, "ProtoJSON Format": "Parsers accept both").
"""

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from google.genai import types

from services.dispatcher.batch_lane.gemini import GeminiBatches
from shared import keys, planning
from shared.planning import JobConfig
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.batches import FILE_TTL_SECONDS, BatchStore, ReferenceFile

# References copied to the Files API at once, per batch being prepared.
UPLOAD_CONCURRENCY = 4
# The JSON of one inline request besides its prompt and references: a generous bound.
REQUEST_ENVELOPE_BYTES = 512


def sniff_mime(data: bytes) -> str:
    """The image type from magic bytes (uploads are checked images: one of these)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "image/heic"
    return "image/png"


@dataclass(frozen=True, slots=True)
class BatchInput:
    """What batches.create takes as `src`, and the files made for it (deleted once it is done)."""

    src: list[types.InlinedRequestDict] | str
    input_file: str | None


class BatchInputs:
    def __init__(self, gemini: GeminiBatches, storage: Storage, store: BatchStore, settings: Settings) -> None:
        self.gemini = gemini
        self.storage = storage
        self.store = store
        self.settings = settings

    async def build(self, job_id: str, config: JobConfig, slots: Sequence[int]) -> BatchInput:
        wanted = sorted({ref for index in slots for ref in planning.slot(config, index).reference_ids})
        files = await self.references(job_id, wanted)
        parts_by_slot = [(index, planning.slot(config, index)) for index in slots]
        inline_bytes = sum(REQUEST_ENVELOPE_BYTES + len(json.dumps(slot.prompt)) for _, slot in parts_by_slot)
        s = self.settings
        if len(slots) <= s.batch_inline_max_requests and inline_bytes <= s.batch_inline_max_bytes:
            src = [
                {
                    "contents": [
                        {"role": "user", "parts": _parts(slot.prompt, [files[r] for r in slot.reference_ids])}
                    ],
                    "config": _config(config),
                    "metadata": {"key": str(index)},
                }
                for index, slot in parts_by_slot
            ]
            return BatchInput(cast(list[types.InlinedRequestDict], src), None)
        name = await self._input_file(job_id, config, parts_by_slot, files)
        return BatchInput(name, name)

    async def references(self, job_id: str, upload_ids: Sequence[str]) -> dict[str, ReferenceFile]:
        """Each upload's copy in the Files API, uploading those the job has not sent yet (or whose
        copy expires soon). A crash between an upload and its note costs one more upload, no more."""
        known = await self.store.reference_files(job_id)
        if all(upload_id in known for upload_id in upload_ids):
            return {upload_id: known[upload_id] for upload_id in upload_ids}
        # One copier per job at a time: batches of one job prepared at once (they share references)
        # wait for it and find its copies, instead of each sending them again.
        async with self.store.references_lock(job_id):
            known = await self.store.reference_files(job_id)
            await self._copy(job_id, [upload_id for upload_id in upload_ids if upload_id not in known], known)
        return {upload_id: known[upload_id] for upload_id in upload_ids}

    async def _copy(self, job_id: str, missing: Sequence[str], known: dict[str, ReferenceFile]) -> None:
        gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def send(upload_id: str) -> None:
            async with gate:
                data = await self.storage.get_bytes(keys.upload_object(upload_id))
                mime_type = sniff_mime(data)
                file = await self.gemini.upload(data, mime_type, f"bunch-{upload_id}")
                expires = file.expiration_time.timestamp() if file.expiration_time else time.time() + FILE_TTL_SECONDS
                copy = ReferenceFile(str(file.name), str(file.uri), mime_type, expires)
                await self.store.remember_reference(job_id, upload_id, copy)
                known[upload_id] = copy

        await asyncio.gather(*(send(upload_id) for upload_id in missing))

    async def _input_file(
        self,
        job_id: str,
        config: JobConfig,
        slots: Sequence[tuple[int, planning.Slot]],
        files: dict[str, ReferenceFile],
    ) -> str:
        generation = _config(config)
        with tempfile.TemporaryDirectory(prefix="bunch-batch-") as folder:
            path = Path(folder) / "requests.jsonl"

            def write() -> None:
                with path.open("w", encoding="utf-8") as out:
                    for index, slot in slots:
                        parts = _parts(slot.prompt, [files[r] for r in slot.reference_ids])
                        request = {"contents": [{"role": "user", "parts": parts}], "generation_config": generation}
                        out.write(json.dumps({"key": str(index), "request": request}) + "\n")

            await asyncio.to_thread(write)
            # The Batch API guide uploads its input with mime_type "jsonl".
            return await self.gemini.upload_path(path, "jsonl", f"bunch-{job_id}-requests")


def _parts(prompt: str, references: Sequence[ReferenceFile]) -> list[dict[str, Any]]:
    # The same order as the realtime lane's worker: the prompt, then the references.
    return [{"text": prompt}] + [{"file_data": {"file_uri": f.uri, "mime_type": f.mime_type}} for f in references]


def _config(config: JobConfig) -> dict[str, Any]:
    result: dict[str, Any] = {"response_modalities": ["IMAGE"]}
    image: dict[str, str] = {}
    if config.params.aspect_ratio:
        image["aspect_ratio"] = config.params.aspect_ratio
    if config.params.image_size:
        image["image_size"] = config.params.image_size
    if image:
        result["image_config"] = image
    return result
