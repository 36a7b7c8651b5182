"""Checking and storing a dataset: the inputs of an automatic job at once, as one ZIP or many files.

A ZIP is never held in memory: the multipart parser spools it to a temporary file, zipfile reads
its central directory from that file, and every entry is judged from the directory before anything
is read (services/gateway/dataset_archive.py). Then the images are checked one at a time, in
archive order: each distinct image is read, hashed and decoded once, within the request's budget
of pixels and CPU time (services/gateway/dataset_costs.py); a copy of an earlier image is found by
its header offset or its hash before it would be decoded, and reported. Only a dataset accepted as
a whole is stored, each distinct image once (read again from the spooled upload, STORE_CONCURRENCY
at a time; a small dataset is kept in memory instead): a refused one leaves nothing behind.
"""

import asyncio
import hashlib
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import IO

from fastapi import UploadFile

from services.gateway.dataset_archive import ARCHIVE_SUFFIXES, Entry, open_entries
from services.gateway.dataset_costs import Budget, run_blocking
from services.gateway.deps import Services
from services.gateway.images import CheckedImage, ImageRejected, check_image
from services.gateway.intake import store_upload
from services.gateway.schemas.datasets import Rejected
from shared.errors import Invalid, TooLarge
from shared.settings import Settings

STORE_CONCURRENCY = 8  # images stored at once: S3 round trips overlap, memory stays bounded
# Checked images held in memory until they are stored, per request: a small dataset is read once,
# and storing it needs no turn in the dataset pool.
KEEP_BYTES = 8 * 1024 * 1024
MAX_FILES = 20_000  # files of one multipart request (the dataset limit itself is in settings)
_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError)


@dataclass(frozen=True, slots=True)
class _Outcome:
    entry: Entry
    image: CheckedImage | None = None
    reason: str | None = None
    data: bytes | None = None  # the image's bytes, if kept to store them (KEEP_BYTES)


def _copy(entry: Entry, first: _Outcome) -> _Outcome:
    """A copy of an earlier entry is reported as such, or refused for the same reason as it was."""
    if first.image is not None:
        return _Outcome(entry, reason=f"same image as {first.entry.name}")
    return _Outcome(entry, reason=first.reason)


# --- the entries of many files ---


def _read_spooled(file: IO[bytes], limit: int) -> bytes:
    """Blocking. At most limit + 1 bytes, so an oversized file is refused without reading it all."""
    file.seek(0)
    return file.read(limit + 1)


def file_entries(files: list[UploadFile], settings: Settings) -> list[Entry]:
    if len(files) > settings.max_inputs_per_job:
        raise TooLarge(f"{len(files)} files; a dataset holds at most {settings.max_inputs_per_job}.")
    entries = []
    for position, file in enumerate(files):
        name = file.filename or f"file {position + 1}"
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            entries.append(Entry(name, reason="an archive among other files (send a ZIP on its own)"))
        else:
            entries.append(Entry(name, read=partial(_read_spooled, file.file, settings.max_upload_bytes)))
    return entries


async def is_archive(files: list[UploadFile]) -> bool:
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


# --- checking, then storing ---


@dataclass(frozen=True, slots=True)
class _Examined:
    image: CheckedImage | None = None
    copy_of: int | None = None  # position of the first entry with the same bytes
    reason: str | None = None
    data: bytes | None = None


class Ingest:
    """One request's images: checked in order within its budget, then stored if all went well."""

    def __init__(self, services: Services, project: str) -> None:
        self.services = services
        self.project = project
        self.settings = settings = services.settings
        self.budget = Budget(settings.max_dataset_pixels, settings.dataset_cpu_seconds)
        self._first_by_digest: dict[str, int] = {}
        self._kept = 0

    async def run(self, entries: list[Entry]) -> tuple[list[str], list[Rejected]]:
        """The upload ids accepted, in order, and the entries rejected, each with its reason;
        Invalid (nothing stored) if no entry is a usable image."""
        outcomes = await self.check(entries)
        accepted = [outcome for outcome in outcomes if outcome.image is not None]
        rejected = [Rejected(name=o.entry.name, reason=o.reason or "rejected") for o in outcomes if o.image is None]
        if not accepted:
            raise _nothing_usable(rejected)
        await self.store(accepted)
        return [outcome.image.upload_id for outcome in accepted if outcome.image is not None], rejected

    async def check(self, entries: list[Entry]) -> list[_Outcome]:
        """Every entry's outcome, in order. One at a time: the order names the first of copies, and
        the budget is charged before each decode, so the work ends where the budget does."""
        outcomes: list[_Outcome] = []
        threads = self.settings.dataset_decode_threads
        for position, entry in enumerate(entries):
            if entry.reason is not None:
                outcomes.append(_Outcome(entry, reason=entry.reason))
            elif entry.same_as is not None:
                outcomes.append(_copy(entry, outcomes[entry.same_as]))
            else:
                found = await run_blocking(self.project, threads, self.budget, partial(self._examine, position, entry))
                if found.copy_of is not None:
                    outcomes.append(_copy(entry, outcomes[found.copy_of]))
                else:
                    outcomes.append(_Outcome(entry, found.image, found.reason, found.data))
        return outcomes

    def _examine(self, position: int, entry: Entry) -> _Examined:
        """Blocking. Reads, hashes and (unless its bytes came earlier) decodes one entry."""
        assert entry.read is not None
        try:
            data = entry.read()
        except _READ_ERRORS as exc:
            return _Examined(reason=f"unreadable entry ({exc})")
        digest = hashlib.sha256(data).hexdigest()
        first = self._first_by_digest.setdefault(digest, position)
        if first != position:
            return _Examined(copy_of=first)
        settings = self.settings
        try:
            image = check_image(
                data,
                settings.max_upload_bytes,
                settings.max_upload_pixels,
                sha256=digest,
                before_decode=self.budget.charge_pixels,
            )
        except ImageRejected as exc:
            return _Examined(reason=exc.reason)
        if self._kept + len(data) > KEEP_BYTES:
            return _Examined(image=image)
        self._kept += len(data)
        return _Examined(image=image, data=data)

    async def store(self, accepted: list[_Outcome]) -> None:
        """Stores each accepted image (distinct by content), STORE_CONCURRENCY at a time."""
        slots = asyncio.Semaphore(STORE_CONCURRENCY)

        async def one(outcome: _Outcome) -> None:
            try:
                assert outcome.entry.read is not None and outcome.image is not None
                data = outcome.data
                if data is None:  # read again; already checked and paid for: no budget applies
                    threads = self.settings.dataset_decode_threads
                    data = await run_blocking(self.project, threads, None, outcome.entry.read)
                await store_upload(self.services.storage, self.services.uploads, self.project, outcome.image, data)
            finally:
                slots.release()

        try:
            async with asyncio.TaskGroup() as tasks:
                for outcome in accepted:
                    await slots.acquire()  # before the task exists: at most STORE_CONCURRENCY in memory
                    tasks.create_task(one(outcome))
        except BaseExceptionGroup as group:
            # Unwrapped, so the app answers "storage unavailable" with a 503.
            raise _first(group) from None


def _first(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _nothing_usable(rejected: list[Rejected]) -> Invalid:
    shown = "; ".join(f"{r.name}: {r.reason}" for r in rejected[:5])
    more = f" (and {len(rejected) - 5} more)" if len(rejected) > 5 else ""
    return Invalid(f"No usable image in the upload. {shown}{more}".strip())


async def ingest(services: Services, project: str, files: list[UploadFile]) -> tuple[list[str], list[Rejected]]:
    """Checks and stores the files (one ZIP, or the images themselves): the upload ids accepted, in
    order, and the entries rejected; Invalid or TooLarge (nothing stored) if the whole is refused."""
    request = Ingest(services, project)
    if not await is_archive(files):
        return await request.run(file_entries(files, services.settings))
    file, threads = files[0].file, services.settings.dataset_decode_threads
    opened = partial(open_entries, file, services.settings)
    archive, entries = await run_blocking(project, threads, request.budget, opened)
    with archive:  # open until every image is stored: they are read from it again then
        return await request.run(entries)
