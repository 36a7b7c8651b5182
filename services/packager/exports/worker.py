"""Copy an export's images (and a manifest per job) to its destination: an EXPORTS_STREAM handler.

The message ({"export_id"}) stays pending until the export has ended, so an export whose packager
is killed is taken up again (by a restarted replica or, after stream_claim_idle_ms, another one).
Taking it up again copies nothing twice:

- every settled object is in the export's set (keys.export_done) and is not looked at again;
- an object copied but not yet settled when the packager died is found at the destination (one
  LIST per page of 256 images, one HEAD for what the LIST shows with the right size) with the
  same CRC-32, and settled as skipped;
- each object is counted once (shared/lua/settle_export_objects.lua, a batch of settlements per
  call: settler.py), so progress never counts a copy twice, and the final counts are the settled
  objects.

Jobs are read a page of image records at a time and copies run `export_concurrency` at a time in
a thread pool of the exporter's own, each holding at most one image (minio reads a single-part PUT
whole): memory depends on those two settings, never on the size of the export.
"""

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from minio.error import MinioException
from redis.asyncio import Redis
from urllib3.exceptions import HTTPError

from services.packager.exports.bucket import CopyFailed, DestinationBucket, Present, crc_text, explain
from services.packager.exports.layout import JobFolder, image_member, manifest_member
from services.packager.exports.manifests import job_manifest
from services.packager.exports.settler import Settler
from shared import keys
from shared.export_destinations import Destination
from shared.models import ImageStatus
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.exports import (
    FINAL_EXPORT_STATUSES,
    ExportLayout,
    ExportRecord,
    ExportStatus,
    ExportStore,
    ObjectError,
    Outcome,
    Settlement,
)
from shared.stores.groups import GroupStore
from shared.stores.jobs import JobStore
from shared.stores.records import JobRecord

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # deliveries of one export that ended with the packager gone, before it is failed
PAGE = 256  # image records read, and destination keys listed, at once
COUNT_CHUNK = 500  # jobs whose image counts are read per Redis call
STORAGE_ERRORS = (MinioException, HTTPError, OSError)

T = TypeVar("T")


class ExportInterrupted(Exception):
    """The packager is shutting down: the export's message stays pending, and the export resumes
    where it stopped on another replica (or this one, restarted)."""


@dataclass(frozen=True, slots=True)
class _Image:
    member: str
    job_id: str
    index: int
    source_key: str
    key: str  # at the destination
    size: int | None
    crc32: int | None
    content_type: str


@dataclass(frozen=True, slots=True)
class _Job:
    id: str
    group_name: str | None  # None: the job's own group (an export of jobs)


class Exporter:
    """A StreamConsumer handler; one per packager, shared by its export consumers."""

    def __init__(self, redis: Redis, store: JobStore, storage: Storage, settings: Settings) -> None:
        self.redis = redis
        self.store = store
        self.storage = storage
        self.settings = settings
        self.exports = ExportStore(redis, settings.export_max_errors_kept)
        self.groups = GroupStore(redis)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.export_workers * settings.export_concurrency, thread_name_prefix="export"
        )
        self._buckets: dict[tuple[str, str], DestinationBucket] = {}
        self.stopping = False  # set at SIGTERM: runs stop taking objects, finish those in flight

    async def wind_down(self, stop: asyncio.Event) -> None:
        """A service loop: once `stop` is set, exports stop after the copies in flight (an image
        each, seconds), instead of holding the shutdown for the rest of the export."""
        await stop.wait()
        self.stopping = True

    async def __call__(self, fields: dict[str, str]) -> None:
        await self.run(fields["export_id"])

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def bucket(self, destination: Destination) -> DestinationBucket:
        name = (destination.project, destination.name)
        if name not in self._buckets:
            pool = self.settings.export_workers * self.settings.export_concurrency
            self._buckets[name] = DestinationBucket(destination, pool, self.settings.s3_read_timeout_seconds)
        return self._buckets[name]

    async def run(self, export_id: str) -> None:
        record = await self.exports.find(export_id)
        if record is None or record.status in FINAL_EXPORT_STATUSES:
            return  # purged, or ended (a redelivered message)
        destination = self.settings.export_destinations_of(record.project).get(record.destination)
        if destination is None:
            error = f"the destination '{record.destination}' is no longer configured for this project"
            await self.exports.finish(export_id, ExportStatus.FAILED, error=error, objects_total=0)
            return
        jobs = await self._jobs(record)
        total = await self._count(jobs, record)
        reply = await self.exports.start(export_id, total)
        if not reply.done:
            return
        if int(reply.values[0]) > MAX_ATTEMPTS:
            error = f"gave up after {MAX_ATTEMPTS} attempts: the packager stopped during each"
            await self.exports.finish(export_id, ExportStatus.FAILED, error=error)
            return
        started = time.monotonic()
        copy = _ExportRun(self, record, destination)
        await copy.execute(jobs)
        log.info("export %s ran in %.2fs: %s", export_id, time.monotonic() - started, copy.summary())

    async def _jobs(self, record: ExportRecord) -> list[_Job]:
        """The export's jobs, in order; a group deleted since the request has none."""
        if not record.group_ids:
            return [_Job(job_id, None) for job_id in dict.fromkeys(record.job_ids)]
        jobs: list[_Job] = []
        for group_id in record.group_ids:
            group = await self.groups.find(record.project, group_id)
            if group is not None:
                jobs += [_Job(job_id, group.name) for job_id in await self.groups.job_ids(group_id)]
        return jobs

    async def _count(self, jobs: list[_Job], record: ExportRecord) -> int:
        """The objects the export will settle, as far as the jobs' counts tell (the final count is
        what it settled)."""
        total = 0
        for start in range(0, len(jobs), COUNT_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for job in jobs[start : start + COUNT_CHUNK]:
                    pipe.hmget(keys.job(job.id), "project", "images_succeeded")
                counts = await pipe.execute()
            for project, succeeded in counts:
                if project == record.project:
                    total += int(succeeded or 0) + (1 if record.include_manifest else 0)
        return total

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))


class _ExportRun:
    """One delivery of one export: its state lives here only while it runs."""

    def __init__(self, exporter: Exporter, record: ExportRecord, destination: Destination) -> None:
        self.exporter = exporter
        self.settings = exporter.settings
        self.record = record
        self.destination = destination
        self.bucket = exporter.bucket(destination)
        storage, settings = exporter.storage, exporter.settings
        # Same server, same keys: the server copies the bytes itself, none pass through Bunch.
        self.server_side = (
            destination.endpoint == settings.s3_endpoint
            and destination.access_key_id.get_secret_value() == settings.s3_access_key.get_secret_value()
            and destination.secret_access_key.get_secret_value() == settings.s3_secret_key.get_secret_value()
        )
        self.source_bucket = storage.bucket
        self.slots = asyncio.Semaphore(settings.export_concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.wide: CopyFailed | None = None  # the destination refuses everything: the rest fails with it
        self.settler = Settler(exporter.exports, record.id)
        self.canceled = False

    def summary(self) -> str:
        return ", ".join(f"{count} {outcome.value}" for outcome, count in self.settler.outcomes.items())

    @property
    def ended(self) -> bool:
        """Canceled, or ended or purged meanwhile: nothing is left to do."""
        return self.canceled or self.settler.ended

    @property
    def halted(self) -> bool:
        return self.ended or self.exporter.stopping or self.settler.failure is not None

    async def execute(self, jobs: list[_Job]) -> None:
        try:
            for job in jobs:
                if self.halted:
                    break
                await self._job(job)
        finally:
            await self._drain()
            await self.settler.close()
        if self.ended:
            return  # the cancel ended it
        if self.exporter.stopping:
            # A rollout is no crash: it does not count toward MAX_ATTEMPTS.
            await self.exporter.exports.forgive_attempt(self.record.id)
            raise ExportInterrupted(f"export {self.record.id} stopped by the shutdown; it resumes from its message")
        await self._finish()

    async def _drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def _finish(self) -> None:
        record = await self.exporter.exports.find(self.record.id)
        if record is None:
            return
        error = None
        status = ExportStatus.COMPLETED
        if record.objects_failed:
            status = ExportStatus.FAILED
            errors = await self.exporter.exports.errors(record.id, 1)
            first = f"; the first: {errors[0].reason}" if errors else ""
            error = f"{record.objects_failed} of {record.objects_done} objects failed{first}"
            if self.wide is not None:
                error = self.wide.reason
        await self.exporter.exports.finish(record.id, status, error=error, objects_total=record.objects_done)

    async def _job(self, job: _Job) -> None:
        record = await self.exporter.store.get(job.id)
        if record is None or record.project != self.record.project:
            return  # purged by retention since the request
        folder = JobFolder(self.destination, self.record.layout, job.group_name or record.group, job.id)
        for start in range(0, record.images_total, PAGE):
            if self.halted:
                return
            if await self.exporter.exports.status(self.record.id) == ExportStatus.CANCELED:
                self.canceled = True
                return
            await self._page(record, folder, start)
        if self.record.include_manifest and not self.halted:
            await self._manifest(record, folder)

    async def _page(self, job: JobRecord, folder: JobFolder, start: int) -> None:
        try:
            _, records = await self.exporter.store.records_page(job.id, start, PAGE)
        except KeyError:
            return  # purged meanwhile
        images = [
            _Image(
                member=image_member(job.id, index),
                job_id=job.id,
                index=index,
                source_key=image.object_key,
                key=folder.image_key(index, image.mime_type),
                size=image.bytes,
                crc32=image.crc32,
                content_type=image.mime_type or "image/png",
            )
            for index, image in sorted(records.items())
            if image.status == ImageStatus.SUCCEEDED and image.object_key
        ]
        settled = await self.exporter.exports.settled(self.record.id, [image.member for image in images])
        waiting = [image for image in images if image.member not in settled]
        if not waiting:
            return
        present: dict[str, Present] = {}
        if self.wide is None:
            low, high = min(image.key for image in waiting), max(image.key for image in waiting)
            try:
                present = await self._attempts(self.bucket.listing, folder.listing_prefix, low, high)
            except CopyFailed as failure:
                if failure.wide:
                    self.wide = failure
                # Otherwise the copies find out for themselves, each with its own tries.
        for image in waiting:
            if self.halted:
                return
            if self.wide is not None:
                self._settle(image.member, image.job_id, image.index, image.key, Outcome.FAILED, 0, self.wide)
                continue
            await self.slots.acquire()
            task = asyncio.create_task(self._copy(image, present.get(image.key)))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _copy(self, image: _Image, present: Present | None) -> None:
        try:
            outcome, copied = await self._transfer(image, present)
            self._settle(image.member, image.job_id, image.index, image.key, outcome, copied)
        except CopyFailed as failure:
            if failure.wide and self.wide is None:
                self.wide = failure
            self._settle(image.member, image.job_id, image.index, image.key, Outcome.FAILED, 0, failure)
        finally:
            self.slots.release()

    async def _transfer(self, image: _Image, present: Present | None) -> tuple[Outcome, int]:
        if present is not None and image.crc32 is not None and present.size == image.size:
            if await self._attempts(self.bucket.checksum, image.key) == crc_text(image.crc32):
                return Outcome.SKIPPED, 0
        if self.server_side:
            await self._attempts(
                self.bucket.copy_within,
                self.source_bucket,
                image.source_key,
                image.key,
                image.crc32,
                image.content_type,
            )
        else:
            await self._attempts(self._stream, image)
        return Outcome.COPIED, image.size or 0

    def _stream(self, image: _Image) -> None:
        """GET from Bunch's storage, PUT to the destination, one object's bytes at most in memory."""
        response = self.exporter.storage.client.get_object(self.source_bucket, image.source_key)
        try:
            size = image.size if image.size is not None else int(response.headers["Content-Length"])
            self.bucket.put_from(response, image.key, size, image.crc32, image.content_type)
        except BaseException:
            response.close()  # left half-read: that connection cannot serve another request
            raise
        finally:
            # Read to its end, the connection goes back to the pool: no TCP connect per image.
            response.release_conn()

    async def _manifest(self, job: JobRecord, folder: JobFolder) -> None:
        member = manifest_member(job.id)
        if await self.exporter.exports.settled(self.record.id, [member]):
            return
        flat = folder.listing_prefix.rsplit("/", 1)[-1] if self.record.layout == ExportLayout.FLAT else ""
        manifest = await job_manifest(
            self.exporter.store, job, self.settings.export_manifest_json_max_images, file_prefix=flat
        )
        key = folder.manifest_key(manifest.jsonl)
        try:
            if self.wide is not None:
                raise self.wide
            if await self._attempts(self.bucket.checksum, key) == crc_text(manifest.crc32):
                self._settle(member, job.id, None, key, Outcome.SKIPPED, 0)
                return
            content_type = "application/x-ndjson" if manifest.jsonl else "application/json"

            def put() -> None:
                manifest.data.seek(0)
                self.bucket.put_file(key, manifest.data, manifest.size, manifest.crc32, content_type)

            await self._attempts(put)
            self._settle(member, job.id, None, key, Outcome.COPIED, manifest.size)
        except CopyFailed as failure:
            if failure.wide and self.wide is None:
                self.wide = failure
            self._settle(member, job.id, None, key, Outcome.FAILED, 0, failure)
        finally:
            manifest.data.close()

    async def _attempts(self, function: Callable[..., T], *args: Any) -> T:
        """`function` in the exporter's threads, tried export_object_attempts times on transient
        failures with doubling pauses; CopyFailed with the reason when it gives up."""
        attempts = self.settings.export_object_attempts
        for attempt in range(1, attempts + 1):
            try:
                return await self.exporter.call(function, *args)
            except (CopyFailed, *STORAGE_ERRORS) as exc:
                failure = explain(exc, self.destination)
                if not failure.transient or attempt == attempts:
                    if failure.transient:
                        failure = CopyFailed(f"{failure.reason} (gave up after {attempts} tries)")
                    raise failure from None
            await asyncio.sleep(self.settings.export_backoff_seconds * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def _settle(
        self,
        member: str,
        job_id: str,
        index: int | None,
        key: str,
        outcome: Outcome,
        copied: int,
        failure: CopyFailed | None = None,
    ) -> None:
        error = None
        if failure is not None:
            error = ObjectError(object=key, job_id=job_id, index=index, reason=failure.reason)
        self.settler.add(Settlement(member, outcome, copied, error))
