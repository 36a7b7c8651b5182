"""Images into Bunch: an uploaded file read within its limit, checked, stored once by content, and
recorded as usable by the project that sent it (POST /api/uploads and /api/datasets)."""

import asyncio
from functools import partial

from fastapi import UploadFile

from services.gateway.dataset_costs import run_blocking
from services.gateway.deps import Services
from services.gateway.images import HEIF_FORMATS, CheckedImage, check_image, declared_pixels, heif_format
from services.gateway.schemas.uploads import UploadInfo
from shared import keys
from shared.gemini_models import spec_for
from shared.storage import Storage
from shared.stores.uploads import UploadStore

# Images up to this size are checked at once (a few tens of ms of one thread), larger ones in turns.
INLINE_DECODE_PIXELS = 4_000_000
READ_CHUNK = 1024 * 1024
SMALL_OBJECT_BYTES = 256 * 1024


async def read_limited(file: UploadFile, limit: int) -> bytes:
    """Read at most limit + 1 bytes, so an oversized file is refused without reading it all."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await file.read(READ_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)


async def check_upload(services: Services, project: str, data: bytes) -> CheckedImage:
    """The checked image, or ImageRejected. HEIC and HEIF are taken when the configured model
    takes them as references (shared/gemini_models.py)."""
    settings = services.settings
    heif_types = spec_for(settings.gemini_model).reference_types & set(HEIF_FORMATS.values())
    check = partial(check_image, data, settings.max_upload_bytes, settings.max_upload_pixels, heif_types=heif_types)
    # HEIC and HEIF are never decoded here (their header is all that is read): no decode to queue.
    if heif_format(data) is not None or (declared_pixels(data) or INLINE_DECODE_PIXELS + 1) <= INLINE_DECODE_PIXELS:
        return await asyncio.to_thread(check)
    # Large (or unreadable) images wait their turn in the pool datasets decode in, on a
    # low-priority thread, instead of taking every core from other projects.
    return await run_blocking(project, settings.dataset_decode_threads, None, check)


async def store_upload(
    storage: Storage, uploads: UploadStore, project: str, image: CheckedImage, data: bytes
) -> UploadInfo:
    """Store a checked image once by content and make it usable by `project`."""
    key = keys.upload_object(image.upload_id)
    must_put = await uploads.use(image.upload_id)
    # Content-addressed, so writing again is harmless; asking first only pays off when the write is
    # large, since a small PUT costs about what the HEAD does.
    if must_put or len(data) <= SMALL_OBJECT_BYTES or not await storage.exists(key):
        await storage.put_bytes(key, data, image.content_type)
    info = UploadInfo(
        id=image.upload_id,
        sha256=image.sha256,
        width=image.width,
        height=image.height,
        format=image.format,
        bytes=image.size,
    )
    await uploads.record(project, image.upload_id, info.model_dump())
    return info
