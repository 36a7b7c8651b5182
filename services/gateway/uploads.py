"""POST /api/uploads: reference and input images, checked, then stored by content hash."""

import asyncio
import json
import time
from functools import partial
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, UploadFile, status
from redis.asyncio import Redis

from services.gateway.dataset_costs import run_blocking
from services.gateway.deps import ProjectDep, RedisDep, SettingsDep, StorageDep
from services.gateway.images import CheckedImage, ImageRejected, check_image, declared_pixels
from services.gateway.schemas import API_PROBLEMS, UploadInfo, UploadsCreated, problems
from shared import keys, scripts
from shared.scripts import Answer
from shared.storage import Storage

# Images up to this size are checked at once (a few tens of ms of one thread), larger ones in turns.
INLINE_DECODE_PIXELS = 4_000_000

router = APIRouter(prefix="/api", tags=["uploads"], responses=API_PROBLEMS)

MAX_FILES = 100  # per request; /api/datasets takes more
READ_CHUNK = 1024 * 1024
SMALL_OBJECT_BYTES = 256 * 1024
RETENTION_WAIT_TRIES, RETENTION_WAIT_SECONDS = 50, 0.1


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


@router.post(
    "/uploads",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadsCreated,
    responses=problems(
        413, 415, described={413: "A file over the size limit, an image with too many pixels, or too many files"}
    ),
)
async def create_uploads(
    files: Annotated[list[UploadFile], File(min_length=1, description="PNG, JPEG or WEBP images")],
    project: ProjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    redis: RedisDep,
) -> UploadsCreated:
    if len(files) > MAX_FILES:
        raise HTTPException(413, f"At most {MAX_FILES} files per upload request; use /api/datasets for more.")
    checked: list[tuple[CheckedImage, bytes]] = []
    # Check every file before storing any, so a bad file leaves nothing behind.
    for file in files:
        data = await read_limited(file, settings.max_upload_bytes)
        try:
            check = partial(check_image, data, settings.max_upload_bytes, settings.max_upload_pixels)
            if (declared_pixels(data) or INLINE_DECODE_PIXELS + 1) <= INLINE_DECODE_PIXELS:
                image = await asyncio.to_thread(check)
            else:
                # Large (or unreadable) images wait their turn in the pool datasets decode in, on a
                # low-priority thread, instead of taking every core from other projects.
                image = await run_blocking(project, settings.dataset_decode_threads, None, check)
        except ImageRejected as exc:
            raise HTTPException(exc.status_code, f"{file.filename or 'file'}: {exc.reason}") from None
        checked.append((image, data))
    uploads = [await store_upload(storage, redis, project, image, data) for image, data in checked]
    return UploadsCreated(uploads=uploads)


async def store_upload(storage: Storage, redis: Redis, project: str, image: CheckedImage, data: bytes) -> UploadInfo:
    """Store a checked image once by content and make it usable by `project` (uploads and datasets)."""
    key = keys.upload_object(image.upload_id)
    must_put = await _mark_used(redis, image.upload_id)
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
    record = keys.upload(project, image.upload_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(record, json.dumps(info.model_dump()))
        pipe.sadd(keys.upload_holders(image.upload_id), record)
        await pipe.execute()
    return info


async def _mark_used(redis: Redis, upload_id: str) -> bool:
    """Note that the upload is used now, once retention is not deleting it; True if it must be PUT."""
    indexes = [keys.UPLOADS_BY_USE, keys.UPLOADS_PURGING]
    for _ in range(RETENTION_WAIT_TRIES):
        args = [upload_id, time.time(), scripts.UPLOAD_PURGE_LEASE_SECONDS]
        answer = await scripts.USE_UPLOAD(redis, indexes, args)
        if answer != Answer.REFUSED:
            return answer == Answer.RECLAIMED
        await asyncio.sleep(RETENTION_WAIT_SECONDS)  # a single object's deletion: milliseconds
    raise HTTPException(503, "This image is being removed by retention right now; send it again in a minute.")
