"""POST /api/datasets: the inputs of an automatic job at once, as one ZIP archive or many files.

A ZIP is never held in memory: the multipart parser spools it to a temporary file, zipfile reads
its central directory from that file, and entries are read one at a time, at most
STORE_CONCURRENCY of them in flight. Every entry is judged before it is read (path tricks, links,
nested archives, sizes, compression ratio) and checked with Pillow after.
"""

import asyncio
import re
import stat
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Annotated, Any

from fastapi import APIRouter, File, HTTPException, UploadFile, status
from pydantic import BaseModel
from redis.asyncio import Redis

from services.gateway.deps import ProjectDep, RedisDep, SettingsDep, StorageDep
from services.gateway.images import ImageRejected, check_image
from services.gateway.schemas import API_PROBLEMS, problems
from services.gateway.uploads import read_limited, store_upload
from shared import keys
from shared.settings import Settings
from shared.storage import Storage

router = APIRouter(prefix="/api/datasets", tags=["datasets"], responses=API_PROBLEMS)

NOT_FOUND = "No such dataset in this project."
MIB = 1024 * 1024
STORE_CONCURRENCY = 8  # images checked and stored at once: S3 round trips overlap, memory stays bounded
DECODE_CONCURRENCY = 2  # full Pillow decodes at once (a 40-megapixel image decodes to ~120 MB)
MAX_FILES = 20_000  # files of one multipart request (the dataset limit itself is in settings)
# A small entry may legitimately compress very well (a flat-colour PNG); a large one that does is a bomb.
BOMB_RATIO = 100
BOMB_MIN_BYTES = 1 * MIB
# The same for the archive as a whole: many small entries of zeros are a ZIP bomb too. Images
# barely compress in a ZIP (PNG, JPEG and WEBP are compressed already), so a real dataset is far
# from this ratio.
ARCHIVE_BOMB_MIN_BYTES = 64 * MIB
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".jar", ".cbz")
# Files operating systems add to archives on their own: skipped, not reported as rejected.
_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")


class Rejected(BaseModel):
    name: str
    reason: str


class DatasetCreated(BaseModel):
    id: str
    count: int
    rejected: list[Rejected]
    created_at: datetime


class DatasetView(BaseModel):
    id: str
    count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class _Item:
    """One file of the upload: its bytes, or why it was refused before they were read."""

    name: str
    read: Callable[[], bytes] | None = None  # blocking: runs in a thread
    data: bytes | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    name: str
    upload_id: str | None
    reason: str | None


# --- judging ZIP entries ---


def _is_junk(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return name.startswith("__MACOSX/") or base.lower() in _JUNK_NAMES or base.startswith("._")


def _path_problem(name: str) -> str | None:
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute path"
    if ".." in name.split("/"):
        return "path leaves the archive (..)"
    return None


def _entry_problem(info: zipfile.ZipInfo, max_bytes: int) -> str | None:
    """Why this entry is refused without reading it, or None."""
    name = info.filename.replace("\\", "/")
    if problem := _path_problem(name):
        return problem
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    if info.flag_bits & 0x1:
        return "encrypted entry"
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "nested archive (archives inside the ZIP are not unpacked)"
    if info.file_size > max_bytes:
        return f"the file is larger than {max_bytes // MIB} MB"
    if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
        return "suspicious compression ratio (possible ZIP bomb)"
    return None


def _is_skipped(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or _is_junk(info.filename.replace("\\", "/"))


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    # zipfile stops at the declared size and checks the CRC, so a lying header cannot make this
    # read more than `limit` bytes.
    with archive.open(info) as member:
        return member.read(limit + 1)


def _declared_entries(file: IO[bytes]) -> int | None:
    """The entry count from the end-of-central-directory record, read before zipfile loads the
    directory (a ZIP of millions of empty entries would cost gigabytes as ZipInfo objects).
    None when unknown: not a ZIP (zipfile then says why), or a Python without this helper."""
    end_record_data = getattr(zipfile, "_EndRecData", None)
    if end_record_data is None:
        return None
    end_record: Any = end_record_data(file)
    file.seek(0)
    return None if end_record is None else int(end_record[getattr(zipfile, "_ECD_ENTRIES_TOTAL", 4)])


def _open_archive(file: IO[bytes], settings: Settings) -> zipfile.ZipFile:
    """Blocking. The archive after the checks that refuse it as a whole."""
    declared = _declared_entries(file)
    if declared is not None and declared > settings.max_dataset_entries:
        raise HTTPException(413, f"The archive has {declared} entries; at most {settings.max_dataset_entries}.")
    try:
        return zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise HTTPException(422, f"The file is not a readable ZIP archive ({exc}).") from None


def _zip_items(archive: zipfile.ZipFile, settings: Settings) -> list[_Item]:
    """Blocking. Every entry to report on, in archive order, without reading any of them."""
    items, candidates, total, compressed = [], 0, 0, 0
    for info in archive.infolist():
        if _is_skipped(info):
            continue
        reason = _entry_problem(info, settings.max_upload_bytes)
        if reason is None:
            candidates += 1
            total += info.file_size
            compressed += info.compress_size

            def read(info: zipfile.ZipInfo = info) -> bytes:
                return _read_entry(archive, info, settings.max_upload_bytes)

            items.append(_Item(info.filename, read=read))
        else:
            items.append(_Item(info.filename, reason=reason))
    if candidates > settings.max_inputs_per_job:
        raise HTTPException(
            413, f"The archive has {candidates} files; a dataset holds at most {settings.max_inputs_per_job}."
        )
    if total > settings.max_dataset_bytes:
        raise HTTPException(
            413,
            f"The archive unpacks to {total // MIB} MB; at most {settings.max_dataset_bytes // MIB} MB per dataset.",
        )
    if total > ARCHIVE_BOMB_MIN_BYTES and total > BOMB_RATIO * max(compressed, 1):
        raise HTTPException(
            413,
            f"The archive unpacks to {total // MIB} MB from {max(compressed // 1024, 1)} KB, more than "
            f"{BOMB_RATIO}:1: refused as a possible ZIP bomb (images barely compress in a ZIP).",
        )
    return items


async def _listed(items: list[_Item]) -> AsyncIterator[_Item]:
    for item in items:
        yield item


async def _file_items(files: list[UploadFile], settings: Settings) -> AsyncIterator[_Item]:
    if len(files) > settings.max_inputs_per_job:
        raise HTTPException(413, f"{len(files)} files; a dataset holds at most {settings.max_inputs_per_job}.")
    for position, file in enumerate(files):
        name = file.filename or f"file {position + 1}"
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            yield _Item(name, reason="an archive among other files (send a ZIP on its own)")
        else:
            yield _Item(name, data=await read_limited(file, settings.max_upload_bytes))


async def _is_archive(files: list[UploadFile]) -> bool:
    if len(files) != 1:
        return False
    file = files[0]
    if (file.filename or "").lower().endswith(".zip") or file.content_type in {
        "application/zip",
        "application/x-zip-compressed",
    }:
        return True
    found = await asyncio.to_thread(zipfile.is_zipfile, file.file)
    await file.seek(0)
    return found


# --- checking and storing ---


class _Ingest:
    """Checks and stores items concurrently, keeping each outcome at its position."""

    def __init__(self, storage: Storage, redis: Redis, project: str, settings: Settings) -> None:
        self.storage = storage
        self.redis = redis
        self.project = project
        self.settings = settings
        self.outcomes: dict[int, _Outcome] = {}
        self._slots = asyncio.Semaphore(STORE_CONCURRENCY)
        self._decoding = asyncio.Semaphore(DECODE_CONCURRENCY)

    async def run(self, items: AsyncIterator[_Item]) -> list[_Outcome]:
        try:
            async with asyncio.TaskGroup() as tasks:
                position = 0
                while True:
                    # Taken before the next item is read, so at most STORE_CONCURRENCY are in memory.
                    await self._slots.acquire()
                    item = await anext(items, None)
                    if item is None:
                        self._slots.release()
                        break
                    tasks.create_task(self._one(position, item))
                    position += 1
        except BaseExceptionGroup as group:
            # Unwrapped, so a 413 stays a 413 and the app answers "storage unavailable" with a 503.
            raise _first(group) from None
        return [self.outcomes[position] for position in range(len(self.outcomes))]

    async def _one(self, position: int, item: _Item) -> None:
        try:
            self.outcomes[position] = await self._check_and_store(item)
        finally:
            self._slots.release()

    async def _check_and_store(self, item: _Item) -> _Outcome:
        if item.reason is not None:
            return _Outcome(item.name, None, item.reason)
        data = item.data
        if item.read is not None:
            try:
                data = await asyncio.to_thread(item.read)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError) as exc:
                return _Outcome(item.name, None, f"unreadable entry ({exc})")
        assert data is not None
        try:
            async with self._decoding:
                image = await asyncio.to_thread(
                    check_image, data, self.settings.max_upload_bytes, self.settings.max_upload_pixels
                )
        except ImageRejected as exc:
            return _Outcome(item.name, None, exc.reason)
        await store_upload(self.storage, self.redis, self.project, image, data)
        return _Outcome(item.name, image.upload_id, None)


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _without_duplicates(outcomes: list[_Outcome]) -> tuple[list[str], list[Rejected]]:
    """Accepted upload ids and rejections, in upload order; a repeated image counts once."""
    accepted: list[str] = []
    rejected: list[Rejected] = []
    first_name: dict[str, str] = {}
    for outcome in outcomes:
        if outcome.upload_id is None:
            rejected.append(Rejected(name=outcome.name, reason=outcome.reason or "rejected"))
        elif outcome.upload_id in first_name:
            rejected.append(Rejected(name=outcome.name, reason=f"same image as {first_name[outcome.upload_id]}"))
        else:
            first_name[outcome.upload_id] = outcome.name
            accepted.append(outcome.upload_id)
    return accepted, rejected


def _nothing_usable(rejected: list[Rejected]) -> HTTPException:
    shown = "; ".join(f"{r.name}: {r.reason}" for r in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    return HTTPException(422, f"No usable image in the upload. {shown}{more}".strip())


async def save_dataset(redis: Redis, project: str, upload_ids: list[str]) -> tuple[str, float]:
    dataset_id, created_at = uuid.uuid4().hex, time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            keys.dataset(dataset_id),
            mapping={"id": dataset_id, "project": project, "count": len(upload_ids), "created_at": created_at},
        )
        pipe.rpush(keys.dataset_inputs(dataset_id), *upload_ids)
        pipe.zadd(keys.DATASETS_BY_USE, {dataset_id: created_at})
        await pipe.execute()
    return dataset_id, created_at


async def dataset_input_ids(redis: Redis, project: str, dataset_id: str) -> list[str] | None:
    """The dataset's upload ids in archive order; None if it is unknown or another project's."""
    if await redis.hget(keys.dataset(dataset_id), "project") != project:
        return None
    return list(await redis.lrange(keys.dataset_inputs(dataset_id), 0, -1))


# --- routes ---


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetCreated,
    responses=problems(413, 422, described={413: "Too many or too large files, or a ZIP bomb", 422: "No usable image"}),
    form_limits={"max_files": MAX_FILES},
)
async def create_dataset(
    files: Annotated[
        list[UploadFile], File(min_length=1, description="One .zip archive, or the image files themselves")
    ],
    project: ProjectDep,
    settings: SettingsDep,
    storage: StorageDep,
    redis: RedisDep,
) -> DatasetCreated:
    ingest = _Ingest(storage, redis, project, settings)
    if await _is_archive(files):
        # Open until every entry is read: the readers run after the listing is done.
        with await asyncio.to_thread(_open_archive, files[0].file, settings) as archive:
            items = await asyncio.to_thread(_zip_items, archive, settings)
            outcomes = await ingest.run(_listed(items))
    else:
        outcomes = await ingest.run(_file_items(files, settings))
    accepted, rejected = _without_duplicates(outcomes)
    if not accepted:
        raise _nothing_usable(rejected)
    dataset_id, created_at = await save_dataset(redis, project, accepted)
    return DatasetCreated(
        id=dataset_id, count=len(accepted), rejected=rejected, created_at=datetime.fromtimestamp(created_at, UTC)
    )


@router.get("/{dataset_id}", response_model=DatasetView, responses=problems(404))
async def dataset_details(dataset_id: str, project: ProjectDep, redis: RedisDep) -> DatasetView:
    raw = await redis.hgetall(keys.dataset(dataset_id))
    if not raw or raw.get("project") != project:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return DatasetView(
        id=dataset_id, count=int(raw["count"]), created_at=datetime.fromtimestamp(float(raw["created_at"]), UTC)
    )
