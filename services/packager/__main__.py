"""The packager process: `python -m services.packager`.

Loops until SIGTERM: job ZIPs (PACKAGING_STREAM), group downloads (DOWNLOADS_STREAM), exports to
the projects' buckets (EXPORTS_STREAM), user webhooks (NOTIFICATIONS_STREAM), and the retention
schedule (an in-process arq worker).
"""

from functools import partial

import uvloop

from services.packager.downloads import DownloadBuilder
from services.packager.exports.worker import Exporter
from services.packager.notifier import run_notifier
from services.packager.packaging import Packager
from services.packager.retention import RetentionSchedule
from services.packager.shutdown import ZipWriters
from shared import keys, metrics
from shared.archive import JobArchive
from shared.bucket_setup import prepare_bucket
from shared.lifecycle import run_service, run_until_signalled
from shared.redis_connection import connect, wait_until_usable
from shared.secret_policy import refuse_unsafe_secrets
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.streams import StreamConsumer, consumer_name


async def main(settings: Settings) -> None:
    refuse_unsafe_secrets(settings)
    redis = connect(settings)
    # Up before Redis is: the probes must answer while the service waits for it.
    exporter = await metrics.serve(redis, settings.metrics_port) if settings.metrics_port else None
    await wait_until_usable(redis)
    storage = Storage(settings)
    await prepare_bucket(storage)
    store = JobStore(redis, settings, JobArchive(storage))
    name = consumer_name(settings, "packager")
    writers = ZipWriters()
    # batch=1 and a heartbeat: a ZIP can take minutes, and must not be claimed as abandoned meanwhile.
    jobs = StreamConsumer(
        redis,
        keys.PACKAGING_STREAM,
        keys.PACKAGER_GROUP,
        name,
        Packager(store, storage, settings, writers),
        batch=1,
        heartbeat=True,
        claim_idle_ms=settings.stream_claim_idle_ms,
    )
    downloads = StreamConsumer(
        redis,
        keys.DOWNLOADS_STREAM,
        keys.PACKAGER_GROUP,
        name,
        DownloadBuilder(redis, store, storage, settings, writers),
        batch=1,
        heartbeat=True,
        claim_idle_ms=settings.stream_claim_idle_ms,
    )
    copier = Exporter(redis, store, storage, settings)
    # Several consumers, one export each: a long export of one project never holds up another's.
    exports = [
        StreamConsumer(
            redis,
            keys.EXPORTS_STREAM,
            keys.PACKAGER_GROUP,
            f"{name}-export-{n}",
            copier,
            batch=1,
            heartbeat=True,
            claim_idle_ms=settings.stream_claim_idle_ms,
        )
        for n in range(settings.export_workers)
    ]
    retention = RetentionSchedule(redis, storage, settings)
    notifier = partial(run_notifier, redis, settings, storage)
    wind_down = partial(writers.wind_down, grace_seconds=settings.packager_shutdown_grace_seconds)
    loops = [jobs.run, downloads.run, *(consumer.run for consumer in exports), copier.wind_down]
    await run_until_signalled([*loops, notifier, retention.run, wind_down])
    copier.close()
    if exporter is not None:
        await exporter.cleanup()
    await redis.aclose()


if __name__ == "__main__":
    # uvloop, as the dispatcher: its loop costs less CPU per copy handed to the exporter's threads
    # and per Redis round trip (bench/exports.py: the exporter's loop thread ~0.24 s against ~0.35 s
    # per 400 objects).
    run_service("packager", main, uvloop.run)
