"""Exports to a project's own bucket: throughput against a raw copy between the same two servers,
and the exporter's peak memory as the export grows.

Redis and two moto S3 servers on loopback: one is Bunch's storage, the other the destination
(credentials that differ from Bunch's own, so the exporter streams GET -> PUT as it does between
two providers; it copies server-side only on the same endpoint with the same keys). Finished jobs
are seeded through the stores (JobStore.create in a group, image records, completed as the
packager leaves them), their images uploaded to Bunch's storage.

- time: --objects images of --object-kb random bytes (4 jobs of one group) copied by the exporter
  (services/packager/exports/worker.py Exporter.run, a manifest per job included) against a raw
  copy of the same objects (GET then PUT of known length, minio clients, a thread pool of
  settings.export_concurrency), each pass into a fresh bucket of the destination; after one raw
  copy not counted (warm-up), --reps pairs of passes, one of each side, the order swapped every
  pair; judged by the median over the pairs of raw time / export time (the two passes of a pair
  run back to back, so a machine whose speed drifts over minutes moves both);
- memory: VmHWM of fresh processes each running one export, of --small and of --large images of
  --small-object-kb (jobs of --job-images, the large one over --groups groups).

    python -m bench.exports [--objects 800 --object-kb 1024 --reps 5 --small 100 --large 10000]
"""

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import uvloop
from minio import Minio
from minio.deleteobjects import DeleteObject
from redis.asyncio import Redis

from bench.common import Report, fmt_mb, fmt_pct, fmt_s, parser, tree_cpu_seconds, vm_status
from deploy.processes import Process, python, scratch_dir, start_redis, start_s3
from services.packager.exports.worker import Exporter
from shared import keys
from shared.archive import JobArchive
from shared.models import ImageStatus, JobStatus, SemiAutoJobRequest
from shared.redis_connection import connect
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.exports import ExportLayout, ExportRecord, ExportStatus, ExportStore
from shared.stores.groups import GroupStore
from shared.stores.jobs import JobStore
from shared.stores.records import ImageRecord

BENCH = "exports"
PROJECT = "bench"
# The destination's credentials: moto without auth accepts any, but they differ from Bunch's own
# (minioadmin), so the exporter streams instead of asking the server for a server-side copy.
DEST_KEY_ENV, DEST_SECRET_ENV = "BENCH_DEST_KEY", "BENCH_DEST_SECRET"
DEST_KEY, DEST_SECRET = "bench-destination-key", "bench-destination-secret"
THROUGHPUT_JOBS = 4
UPLOADERS = 8  # threads seeding Bunch's storage


# ------------------------------------------------------------------------------------ settings


def bench_settings(redis_url: str, s3_url: str, dest_url: str, buckets: list[str]) -> Settings:
    """Bunch's settings with one destination per bucket, named after it."""
    os.environ[DEST_KEY_ENV], os.environ[DEST_SECRET_ENV] = DEST_KEY, DEST_SECRET
    spec = {
        "endpoint": dest_url,
        "prefix": "",
        "access_key_id_env": DEST_KEY_ENV,
        "secret_access_key_env": DEST_SECRET_ENV,
    }
    destinations = {PROJECT: {bucket: {**spec, "bucket": bucket} for bucket in buckets}}
    return Settings(redis_url=redis_url, s3_endpoint=s3_url, export_destinations=json.dumps(destinations))


def destination_client(dest_url: str) -> Minio:
    return Minio(dest_url.removeprefix("http://"), DEST_KEY, DEST_SECRET, secure=False, region="us-east-1")


# ------------------------------------------------------------------------------------ seeding


@dataclass
class Seeded:
    """A group of finished jobs whose images are in Bunch's storage."""

    group_id: str
    jobs: int
    images: int
    bytes: int
    object_keys: list[tuple[str, int]]  # source key, size


def upload_job(storage: Storage, job_id: str, images: int, object_bytes: int, run_size: int) -> dict[int, ImageRecord]:
    """The job's images in Bunch's storage, under the keys the workers write, and their records."""

    def put(index: int) -> tuple[int, ImageRecord]:
        data = random.Random(f"{job_id}:{index}").randbytes(object_bytes)
        key = keys.image_object(keys.run_id(job_id, index // run_size), index, 1, "")
        storage.client.put_object(storage.bucket, key, io.BytesIO(data), len(data), "image/png")
        record = ImageRecord(
            status=ImageStatus.SUCCEEDED,
            attempt=1,
            object_key=key,
            mime_type="image/png",
            bytes=len(data),
            crc32=zlib.crc32(data),
            prompt_tokens=258,
            output_tokens=1290,
            finished_at=time.time(),
        )
        return index, record

    with ThreadPoolExecutor(UPLOADERS) as pool:
        return dict(pool.map(put, range(images)))


async def seed_group(
    redis: Redis, store: JobStore, storage: Storage, name: str, jobs: int, images_per_job: int, object_bytes: int
) -> Seeded:
    """A group of `jobs` finished jobs of `images_per_job` images each, as the packager leaves them."""
    group = await GroupStore(redis).create(PROJECT, name)
    config = SemiAutoJobRequest(mode="semi_auto", group=name, prompts=["a fox"], images_per_prompt=images_per_job)
    run_size = store.settings.run_size_for(config.lane)
    seeded = Seeded(group.id, jobs, 0, 0, [])
    for _ in range(jobs):
        job = await store.create(PROJECT, config, group_id=group.id)
        records = await asyncio.to_thread(upload_job, storage, job.id, images_per_job, object_bytes, run_size)
        mapping = {str(index): record.model_dump_json(exclude_none=True) for index, record in records.items()}
        await redis.hset(keys.job_images(job.id), mapping=mapping)
        finished = {"status": JobStatus.PACKAGING.value, "images_succeeded": len(records), "runs_done": job.runs_total}
        await redis.hset(keys.job(job.id), mapping=finished)
        if not await store.transition(job.id, JobStatus.PACKAGING, JobStatus.COMPLETED):
            raise RuntimeError(f"job {job.id} could not be completed")
        seeded.images += len(records)
        seeded.bytes += sum(record.bytes or 0 for record in records.values())
        seeded.object_keys += [(record.object_key or "", record.bytes or 0) for record in records.values()]
    return seeded


async def new_export(exports: ExportStore, destination: str, seeded: list[Seeded]) -> str:
    record = await exports.create(
        PROJECT,
        destination,
        job_ids=[],
        group_ids=[s.group_id for s in seeded],
        layout=ExportLayout.BY_GROUP,
        include_manifest=True,
        webhook_url=None,
    )
    return record.id


async def verify(exports: ExportStore, export_id: str, seeded: list[Seeded]) -> ExportRecord:
    """The export completed and copied every image and every job's manifest: a benchmark of a
    failed or partial export would measure nothing."""
    record = await exports.find(export_id)
    images, jobs = sum(s.images for s in seeded), sum(s.jobs for s in seeded)
    if (
        record is None
        or record.status != ExportStatus.COMPLETED
        or record.objects_copied != images + jobs
        or record.objects_failed
        or record.bytes_copied < sum(s.bytes for s in seeded)
    ):
        raise RuntimeError(f"export {export_id} did not copy {images} images and {jobs} manifests: {record}")
    return record


# ------------------------------------------------------------------------------------ the two sides


def raw_copy(storage: Storage, dest: Minio, bucket: str, objects: list[tuple[str, int]], concurrency: int) -> int:
    """The baseline: GET each object from Bunch's storage, PUT it with its known length."""

    def copy(item: tuple[str, int]) -> int:
        key, size = item
        response = storage.client.get_object(storage.bucket, key)
        try:
            dest.put_object(bucket, key, cast(BinaryIO, response), size, "image/png")
        except BaseException:
            response.close()
            raise
        finally:
            response.release_conn()  # read to its end: the connection is kept, as the exporter keeps it
        return size

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(copy, objects))


async def run_export(redis: Redis, settings: Settings, storage: Storage, export_id: str) -> None:
    exporter = Exporter(redis, JobStore(redis, settings, JobArchive(storage)), storage, settings)
    try:
        await exporter.run(export_id)
    finally:
        exporter.close()


def empty_bucket(dest: Minio, bucket: str) -> int:
    """Delete what a pass wrote (moto keeps it in memory), outside the timed part; how many."""
    names = [item.object_name or "" for item in dest.list_objects(bucket, recursive=True)]
    errors = list(dest.remove_objects(bucket, (DeleteObject(name) for name in names)))
    if errors:
        raise RuntimeError(f"could not empty {bucket}: {errors[0]}")
    return len(names)


# ------------------------------------------------------------------------------------ child process


async def child_async(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter so VmHWM is the exporter's alone; prints one JSON line."""
    settings = bench_settings(args.redis, args.s3, args.dest, [args.bucket])
    redis = connect(settings)
    storage = Storage(settings)
    try:
        await redis.ping()
        before = vm_status()
        started = time.perf_counter()
        await run_export(redis, settings, storage, args.export_id)
        seconds = time.perf_counter() - started
    finally:
        await redis.aclose()
    print(json.dumps({"hwm": vm_status()["VmHWM"], "rss_before": before["VmRSS"], "seconds": seconds}))


def measure_child(redis_url: str, s3_url: str, dest_url: str, bucket: str, export_id: str) -> dict[str, Any]:
    command = ["-m", "bench.exports", "--child", "--redis", redis_url, "--s3", s3_url, "--dest", dest_url]
    out = subprocess.run(
        python(*command, "--bucket", bucket, "--export-id", export_id), capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"exporter child failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------ parent


@dataclass
class Throughput:
    raw: list[float]
    bunch: list[float]
    cpu: dict[str, list[dict[str, float]]]  # side -> per pass: process -> CPU seconds
    images: int
    bytes: int
    jobs: int
    seed_seconds: float


def cpu_readings(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of this process (the client side: raw copy or exporter) and the servers."""
    return {"client": time.process_time(), **{name: tree_cpu_seconds(pid) for name, pid in pids.items()}}


async def throughput(
    args: argparse.Namespace, redis: Redis, settings: Settings, storage: Storage, dest_url: str, pids: dict[str, int]
) -> Throughput:
    store = JobStore(redis, settings, JobArchive(storage))
    exports = ExportStore(redis, max_active=1000)
    dest = destination_client(dest_url)
    started = time.perf_counter()
    per_job = args.objects // THROUGHPUT_JOBS
    seeded = await seed_group(redis, store, storage, "throughput", THROUGHPUT_JOBS, per_job, args.object_kb * 1024)
    seed_seconds = time.perf_counter() - started
    print(f"exports: seeded {seeded.images} objects of {args.object_kb} KB in {seed_seconds:.1f} s", flush=True)
    # Not counted: the first copy into a server grows its heap (moto keeps objects in memory) and
    # opens the clients' first connections; whichever side went first would pay for it.
    dest.make_bucket("warm-up")
    raw_copy(storage, dest, "warm-up", seeded.object_keys, settings.export_concurrency)
    empty_bucket(dest, "warm-up")
    times: dict[str, list[float]] = {"raw": [], "bunch": []}
    cpu: dict[str, list[dict[str, float]]] = {"raw": [], "bunch": []}
    for rep in range(args.reps):
        # Alternate, and swap who goes first, so neither side always runs on a warmer server.
        for what in ("raw", "bunch") if rep % 2 == 0 else ("bunch", "raw"):
            bucket = f"{what}-{rep}"
            dest.make_bucket(bucket)
            cpu_before = cpu_readings(pids)
            if what == "raw":
                started = time.perf_counter()
                copied = raw_copy(storage, dest, bucket, seeded.object_keys, settings.export_concurrency)
                seconds = time.perf_counter() - started
                if copied != seeded.bytes:
                    raise RuntimeError(f"raw copy moved {copied} bytes of {seeded.bytes}")
            else:
                export_id = await new_export(exports, bucket, [seeded])
                started = time.perf_counter()
                await run_export(redis, settings, storage, export_id)
                seconds = time.perf_counter() - started
                await verify(exports, export_id, [seeded])
            cpu_after = cpu_readings(pids)
            cpu[what].append({name: cpu_after[name] - cpu_before[name] for name in cpu_after})
            times[what].append(seconds)
            written = empty_bucket(dest, bucket)
            used = ", ".join(f"{name} {value:.2f}" for name, value in cpu[what][-1].items())
            print(f"    {what} pass {rep}: {seconds:.2f} s ({written} objects); CPU s: {used}", flush=True)
    return Throughput(times["raw"], times["bunch"], cpu, seeded.images, seeded.bytes, seeded.jobs, seed_seconds)


@dataclass
class Peak:
    """One export run by a fresh process, and what the child measured."""

    groups: int
    jobs: int
    images: int
    result: dict[str, Any]


async def memory(
    args: argparse.Namespace, redis: Redis, settings: Settings, storage: Storage, urls: tuple[str, str, str]
) -> list[Peak]:
    """The small export and the large one, each run by a fresh process."""
    store = JobStore(redis, settings, JobArchive(storage))
    exports = ExportStore(redis, max_active=1000)
    size = args.small_object_kb * 1024
    per_job = args.job_images
    started = time.perf_counter()
    small = [await seed_group(redis, store, storage, "memory-small", max(1, args.small // per_job), per_job, size)]
    jobs = max(1, args.large // per_job)
    groups = min(args.groups, jobs)
    large = [
        await seed_group(
            redis, store, storage, f"memory-large-{n}", jobs // groups + (n < jobs % groups), per_job, size
        )
        for n in range(groups)
    ]
    images = sum(s.images for s in small + large)
    print(f"exports: seeded {images} objects of {args.small_object_kb} KB in {time.perf_counter() - started:.1f} s")
    results = []
    for bucket, seeded in (("memory-small", small), ("memory-large", large)):
        destination_client(urls[2]).make_bucket(bucket)
        export_id = await new_export(exports, bucket, seeded)
        result = measure_child(*urls, bucket, export_id)
        await verify(exports, export_id, seeded)
        images = sum(s.images for s in seeded)
        print(f"    {images} objects: VmHWM {fmt_mb(result['hwm'])} in {result['seconds']:.1f} s", flush=True)
        results.append(Peak(len(seeded), sum(s.jobs for s in seeded), images, result))
    return results


def cpu_summary(passes: list[dict[str, float]], gb: float) -> str:
    return ", ".join(f"{name} {sum(p[name] for p in passes) / len(passes) / gb:.2f}" for name in passes[0])


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def total_cpu(passes: list[dict[str, float]], gb: float) -> float:
    return sum(sum(p.values()) for p in passes) / len(passes) / gb


def cores(speed: Throughput, what: str) -> float:
    """Cores the client and the servers kept busy, on average over the side's passes."""
    seconds = speed.raw if what == "raw" else speed.bunch
    return sum(sum(used.values()) for used in speed.cpu[what]) / sum(seconds)


def pid_of(proc: Process) -> int:
    assert proc.popen is not None
    return proc.popen.pid


async def run(args: argparse.Namespace) -> int:
    report = Report(args)
    began = time.monotonic()
    workdir = scratch_dir("bunch-bench-exports-")
    redis_proc, redis_url = start_redis(workdir)
    s3_proc, s3_url = start_s3(workdir)
    (workdir / "destination").mkdir()  # its own log beside the source's
    dest_proc, dest_url = start_s3(workdir / "destination")
    buckets = [f"{what}-{rep}" for rep in range(args.reps) for what in ("raw", "bunch")]
    settings = bench_settings(redis_url, s3_url, dest_url, [*buckets, "memory-small", "memory-large"])
    redis = connect(settings)
    try:
        storage = Storage(settings)
        await storage.ensure_bucket()
        pids = {name: pid_of(proc) for name, proc in (("source S3", s3_proc), ("destination S3", dest_proc))}
        pids["redis"] = pid_of(redis_proc)
        speed = await throughput(args, redis, settings, storage, dest_url, pids)
        small, large = await memory(args, redis, settings, storage, (redis_url, s3_url, dest_url))
    finally:
        await redis.aclose()
        for proc in (dest_proc, s3_proc, redis_proc):
            proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    mb = speed.bytes / 1024 / 1024
    raw_best, bunch_best = min(speed.raw), min(speed.bunch)
    pairs = sorted(raw / bunch for raw, bunch in zip(speed.raw, speed.bunch, strict=True))
    ratio = statistics.median(pairs)
    concurrency = settings.export_concurrency
    report.add(
        BENCH,
        f"raw copy of {speed.images} objects, {mb:.0f} MB (GET + PUT, {concurrency} threads)",
        f"{fmt_s(raw_best)} ({mb / raw_best:.1f} MB/s)",
    )
    report.add(
        BENCH, "export of the same objects (+ a manifest per job)", f"{fmt_s(bunch_best)} ({mb / bunch_best:.1f} MB/s)"
    )
    report.add(
        BENCH,
        f"export throughput / raw copy throughput (median of {len(pairs)} pairs)",
        fmt_pct(ratio),
        "≥ 90 %",
        ratio >= 0.9,
    )
    gb = mb / 1024
    client = {what: min(used["client"] for used in speed.cpu[what]) / gb for what in ("raw", "bunch")}
    report.add(BENCH, "client CPU per GB: raw copy / exporter", f"{client['raw']:.2f} s / {client['bunch']:.2f} s")
    for peak in (small, large):
        report.add(BENCH, f"exporter peak RSS (VmHWM), {peak.images:,} objects", fmt_mb(peak.result["hwm"]))
    growth = large.result["hwm"] / small.result["hwm"]
    report.add(
        BENCH,
        f"peak RSS {large.images:,} / {small.images:,} objects",
        f"{growth:.2f}",
        "≤ 1.25 (flat)",
        growth <= 1.25,
    )
    raw_cpu, export_cpu = total_cpu(speed.cpu["raw"], gb), total_cpu(speed.cpu["bunch"], gb)
    busy = f"{cores(speed, 'raw'):.2f} (raw) and {cores(speed, 'bunch'):.2f} (export) of the {os.cpu_count()} cores"
    exports = [
        f"{p.images:,} objects ({plural(p.jobs, 'job')}, {plural(p.groups, 'group')}) "
        f"{fmt_mb(p.result['hwm'])} in {p.result['seconds']:.1f} s"
        for p in (small, large)
    ]
    report.note(
        BENCH,
        f"""Redis and two moto S3 servers (`moto_server`, in memory) on loopback: Bunch's storage and the
destination, with other credentials than Bunch's, so the exporter streams each object GET -> PUT
(`_stream`: the size and CRC-32 checked as it passes). Finished jobs seeded through the stores
(JobStore.create in a group, image records, completed), images of random bytes uploaded to Bunch's
storage under the workers' keys.

Time: {speed.images} objects of {args.object_kb} KB in {speed.jobs} jobs of one group (seeded in
{speed.seed_seconds:.0f} s). Raw copy: each object GET from the source and PUT with its known length to
the destination, minio clients, a pool of {concurrency} threads (settings.export_concurrency). Export:
`Exporter.run` of a by_group export of that group with manifests ({speed.jobs} more small PUTs, and a
HEAD each), progress settled in Redis a batch per call (settler.py), on uvloop as in the packager. Each pass into a
fresh bucket, emptied after it; one raw copy first, not counted (warm-up); then {args.reps} pairs of
passes, the order swapped every pair (raw {", ".join(f"{t:.2f}" for t in speed.raw)} s; export
{", ".join(f"{t:.2f}" for t in speed.bunch)} s). Judged: the median of the pairs' raw / export
({", ".join(fmt_pct(p) for p in pairs)}), because this machine's speed drifts by tens of percent
over minutes and both passes of a pair run back to back; the best times are reported beside it.

CPU seconds per GB, mean of the passes: raw copy {cpu_summary(speed.cpu["raw"], gb)};
export {cpu_summary(speed.cpu["bunch"], gb)}. In all {export_cpu:.1f} against {raw_cpu:.1f}
({(export_cpu / raw_cpu - 1) * 100:+.1f} %), with {busy} busy during the passes: on this machine the
copy is bound by CPU (both S3 servers are Python on the same cores), so the exporter's extra client
CPU (the CRC-32 of every byte, the settlements, the event loop handing copies to its threads) costs
about as much throughput; between real servers the copies wait on the network.

Memory: VmHWM of a fresh `python -m bench.exports --child ...` process running one export (imports
included: VmRSS before the export {fmt_mb(small.result["rss_before"])}), objects of {args.small_object_kb} KB in jobs of
{args.job_images} images: {exports[0]}; {exports[1]}.
Every export checked completed with each image and manifest copied. Whole run {time.monotonic() - began:.0f} s.""",
    )
    return report.finish([BENCH])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--objects", type=int, default=800, help="objects of the timed comparison")
    p.add_argument("--object-kb", type=int, default=1024, help="size of each object of the timed comparison")
    p.add_argument("--reps", type=int, default=5, help="pairs of passes (raw, export) of the timed comparison")
    p.add_argument("--small", type=int, default=100, help="objects of the small export (peak RSS)")
    p.add_argument("--large", type=int, default=10_000, help="objects of the large export (peak RSS)")
    p.add_argument("--small-object-kb", type=int, default=16, help="size of each object of the peak-RSS exports")
    p.add_argument("--job-images", type=int, default=100, help="images per job of the peak-RSS exports")
    p.add_argument("--groups", type=int, default=4, help="groups of the large export")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--redis", "--s3", "--dest", "--bucket", "--export-id"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        uvloop.run(child_async(args))
        return
    sys.exit(uvloop.run(run(args)))  # the packager's loop


if __name__ == "__main__":
    main()
