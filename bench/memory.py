"""Redis memory per finished and per queued image as history grows: is Redis bounded?

Drives the services' own scripts directly through the stores (not the whole stack: 100,000 images
through RunPod and Gemini emulators would take most of an hour on 2 cores), against a private
redis-server and moto's S3 server: jobs of 40 images (10 runs of 4) are created, every run is
claimed and completed with realistic image records, the job is completed as the packager does
(its ZIP step left out) and archived by the packager's own call (`JobStore.archive_job`). At 10,000,
25,000, 50,000 and 100,000 finished images Redis's `used_memory` is read against its reading after a
first 200 jobs (scripts loaded, per-project keys set up, the job indexes past the 128 entries where
Redis changes their encoding: fixed costs, not history).

What the services consume and trim in production is trimmed here the same way before each reading
(the packaging and notification streams: the packager acknowledges and trims them). The events
stream is a fixed resume window for SSE clients (the last 100,000 entries), not history: it is
reported on its own and left out of the per-image figures.

    python -m bench.memory [--images 100000] [--smoke] [--no-record]
"""

import asyncio
import shutil
import sys
import time
import zlib
from typing import Any

from redis.asyncio import Redis

from bench.common import Report, parser
from deploy.processes import scratch_dir, start_redis, start_s3
from shared import keys
from shared.archive import JobArchive
from shared.models import ImageStatus, JobStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.jobs import JobStore
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore

BENCH = "memory"
JOB_IMAGES = 40
CONFIG = SemiAutoJobRequest(
    mode="semi_auto",
    group="bench",
    prompts=["a red fox in fresh snow, morning light, photographed from a low angle"],
    images_per_prompt=JOB_IMAGES,
)
CHECKPOINTS = (10_000, 25_000, 50_000, 100_000)
WARM_UP_JOBS = 200
SMOKE_CHECKPOINTS, SMOKE_WARM_UP_JOBS = (400, 800), 20
TRIMMED_STREAMS = (keys.PACKAGING_STREAM, keys.NOTIFICATIONS_STREAM)


async def used_memory(redis: Redis) -> int:
    # Trimmed as their consumers would have; then what the events window holds is set apart.
    for stream in TRIMMED_STREAMS:
        await redis.xtrim(stream, maxlen=0)
    info = await redis.info("memory")
    events = await redis.memory_usage(keys.EVENTS_STREAM) or 0
    # Client buffers are the benchmark's own connections, not what Redis keeps.
    return int(info["used_memory"]) - int(info["mem_clients_normal"]) - int(events)


def image_records(run_id: str, attempt: int, claim: str, slots: list[int]) -> dict[int, ImageRecord]:
    return {
        index: ImageRecord(
            status=ImageStatus.SUCCEEDED,
            attempt=attempt,
            object_key=keys.image_object(run_id, index, attempt, claim),
            mime_type="image/png",
            bytes=1_400_000 + index,
            crc32=zlib.crc32(run_id.encode()) + index,
            prompt_tokens=258,
            output_tokens=1290,
            finished_at=time.time(),
        )
        for index in slots
    }


async def finish_jobs(store: JobStore, runs: RunStore, count: int) -> None:
    """`count` jobs created, run, completed and archived as the services would."""
    jobs = await asyncio.gather(*(store.create("bench", CONFIG, group_name=CONFIG.group) for _ in range(count)))
    claims: list[ClaimedRun] = []
    while claimed := (await runs.acquire_many(time.time(), time.time() + 600, 16)).runs:
        claims += claimed
    assert len(claims) == sum(job.runs_total for job in jobs), len(claims)

    async def complete(run_id: str, attempt: int, claim: str) -> None:
        slots = list(await runs.run_slots(run_id, CONFIG))
        records = image_records(run_id, attempt, claim, slots)
        assert await runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, records))

    await asyncio.gather(*(complete(*run) for run in claims))

    async def package(job_id: str) -> None:
        assert await store.transition(job_id, JobStatus.PACKAGING, JobStatus.COMPLETED, zip_bytes=1_000_000)
        assert await store.archive_job(job_id)

    await asyncio.gather(*(package(job.id) for job in jobs))


async def queued_image_bytes(redis: Redis, store: JobStore, jobs: int) -> float:
    """Redis bytes per image of jobs waiting in the queue (the project paused: nothing starts)."""
    await store.set_paused("queued", True)
    before = await used_memory(redis)
    for _ in range(jobs):
        await store.create("queued", CONFIG)
    return (await used_memory(redis) - before) / (jobs * JOB_IMAGES)


async def main_async(args: Any) -> int:
    report = Report(args)
    workdir = scratch_dir("bunch-bench-memory-")
    redis_proc, redis_url = start_redis(workdir)
    s3_proc, s3_url = start_s3(workdir)
    redis = Redis.from_url(redis_url, decode_responses=True)
    began = time.monotonic()
    readings: list[tuple[int, int, int]] = []  # finished images, Redis bytes, events window bytes
    try:
        settings = Settings(redis_url=redis_url, s3_endpoint=s3_url, max_concurrency=1000)
        storage = Storage(settings)
        await storage.ensure_bucket()
        store = JobStore(redis, settings, JobArchive(storage))
        runs = RunStore(redis, settings)
        for _ in range((SMOKE_WARM_UP_JOBS if args.smoke else WARM_UP_JOBS) // 10):
            await finish_jobs(store, runs, 10)
        base = await used_memory(redis)
        checkpoints = SMOKE_CHECKPOINTS if args.smoke else [c for c in CHECKPOINTS if c <= args.images]
        finished = 0
        for checkpoint in checkpoints:
            while finished < checkpoint:
                await finish_jobs(store, runs, 10)
                finished += 10 * JOB_IMAGES
            readings.append((finished, await used_memory(redis) - base, await redis.memory_usage(keys.EVENTS_STREAM)))
            print(f"  {finished} images finished: {readings[-1][1] / finished:.1f} B each", flush=True)
        per_queued = await queued_image_bytes(redis, store, 25 if args.smoke else 250)
    finally:
        await redis.aclose()
        redis_proc.stop()
        s3_proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    for images, used, events in readings:
        jobs = images // JOB_IMAGES
        report.add(
            BENCH,
            f"{images:,} images finished ({jobs:,} jobs)",
            f"{used / images:.1f} B per image, {used / jobs:.0f} B per job",
        )
        report.add(BENCH, f"{images:,} images finished: events resume window (set apart)", f"{events / 1e6:.1f} MB")
    last_images, last_used, _ = readings[-1]
    per_image, per_job = last_used / last_images, last_used / (last_images // JOB_IMAGES)
    report.add(BENCH, "Redis per finished image", f"{per_image:.1f} B")
    report.add(BENCH, "Redis per finished job", f"{per_job:.0f} B")
    first_images, first_used, _ = readings[0]
    growth = per_image / (first_used / first_images) - 1
    # What must not happen is growth with history: a finished image costing less at 100,000 than
    # at 10,000 (fixed costs spread thinner, the allocator's and hash tables' steps) is no leak.
    report.add(
        BENCH,
        f"per finished image, {first_images:,} -> {last_images:,} images",
        f"{growth:+.1%}",
        "no growth (≤ +10 %)",
        growth <= 0.10,
    )
    report.add(BENCH, "Redis per queued image (jobs of 40, project paused)", f"{per_queued:.1f} B")
    # Finished work is archived beside its ZIP: once done, an image must weigh on Redis less than it
    # did waiting in the queue, whatever the allocator's sizes on this machine.
    report.add(
        BENCH,
        "Redis per finished image / per queued image",
        f"{per_image / per_queued:.2f}",
        "≤ 1.0",
        per_image <= per_queued,
    )
    report.note(
        BENCH,
        f"""Scripts driven through the stores against a private redis-server and moto's S3 server, not the
whole stack (100,000 images through the emulators would take most of an hour on 2 cores): semi_auto
jobs of {JOB_IMAGES} images, every run claimed and completed with full image records, each job
completed as the packager does (no ZIP built) and archived by JobStore.archive_job, the packager's
call. Readings are used_memory (less the benchmark's own client buffers) against the reading after a
first {WARM_UP_JOBS} jobs, after trimming the job and packaging
streams as their consumers do, with the events stream (a fixed resume window, the last 100,000
entries) set apart. Judged, as ratios of this run's own readings: the growth of the bytes per finished
image from the first reading to the last (at most +10 %; they fall as fixed costs spread over more
images), and a finished image's bytes against a queued one's.
Whole run {time.monotonic() - began:.0f} s.""",
    )
    return report.finish([BENCH])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--images", type=int, default=CHECKPOINTS[-1], help="finished images at the last reading")
    args = p.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
