"""Benchmark 3: the packager's streaming ZIP against a raw copy, and its memory against a naive build.

In moto's S3 server: objects of 2 MB of random bytes (incompressible, like PNGs).
- time: services.packager.zipper.write_zip of ~1 GB (500 objects, size and CRC known as the worker
  reports them) against a raw copy of the same objects (GET each, one multipart PUT of their
  concatenation through shared.storage.Storage, no ZIP), alternated, best of --reps each;
- memory: VmHWM of fresh processes running write_zip over 250 MB and over 2 GB (the worst of 2
  each), and of one building the 250 MB ZIP in memory with `zipfile` then uploading it (the naive way).

    python -m bench.packaging [--size-mb 1000 --small-mb 250 --large-mb 2000 --reps 3]
"""

import argparse
import asyncio
import io
import json
import random
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Report, fmt_mb, fmt_pct, fmt_s, parser, vm_status
from deploy.processes import python, scratch_dir, start_s3
from services.packager.zipper import ZipEntry, write_zip
from shared.settings import Settings
from shared.storage import Storage

B3 = "3 packaging"
OBJECT_BYTES = 2 * 1024 * 1024
PREFIX = "bench/src/"


def object_key(i: int) -> str:
    return f"{PREFIX}{i:05d}.png"


class RawReader(io.RawIOBase):
    """A file over the concatenated chunks of several objects (the raw-copy baseline)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._pending:
                self._pending = next(self._chunks, b"")
                if not self._pending:
                    break
            n = min(len(view) - filled, len(self._pending))
            view[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        return filled


def raw_copy(storage: Storage, keys: list[str], dest: str, part_size: int) -> int:
    def chunks() -> Iterator[bytes]:
        for key in keys:
            yield from storage.iter_object(key)

    with io.BufferedReader(RawReader(chunks())) as reader:
        return storage.put_stream(dest, reader, part_size, "application/octet-stream")


def entries(objects: list[tuple[str, int, int]], known_crc: bool = True) -> Iterator[ZipEntry]:
    when = datetime(2025, 1, 1, tzinfo=UTC)
    for key, size, crc in objects:
        name = key.rsplit("/", 1)[1]
        if known_crc:
            yield ZipEntry(name=name, object_key=key, modified_at=when, size=size, crc32=crc)
        else:
            yield ZipEntry(name=name, object_key=key, modified_at=when)
    yield ZipEntry(name="manifest.json", data=b'{"bench": true}', modified_at=when, compress=True)


def naive_zip(storage: Storage, objects: list[tuple[str, int, int]], dest: str) -> int:
    """The naive way: the whole archive in a BytesIO, then one upload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key, _, _ in objects:
            response = storage.client.get_object(storage.bucket, key)
            try:
                archive.writestr(key.rsplit("/", 1)[1], response.read())
            finally:
                response.close()
                response.release_conn()
    size = buffer.tell()
    buffer.seek(0)
    storage.client.put_object(storage.bucket, dest, buffer, size, "application/zip")
    return size


# ------------------------------------------------------------------------------------ child process


def child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter so VmHWM is this work's alone; prints one JSON line."""
    storage = Storage(Settings(s3_endpoint=args.s3))
    objects = [tuple(o) for o in json.loads(Path(args.objects).read_text())][: args.count]
    baseline = vm_status()
    started = time.perf_counter()
    dest = f"bench/out/{args.child}-{args.count}.zip"
    if args.child == "zip":
        size = write_zip(storage, dest, entries(objects), Settings().zip_part_size)
    else:
        size = naive_zip(storage, objects, dest)
    seconds = time.perf_counter() - started
    storage.client.remove_object(storage.bucket, dest)
    status = vm_status()
    print(json.dumps({"hwm": status["VmHWM"], "rss_before": baseline["VmRSS"], "seconds": seconds, "bytes": size}))


def measure_child(mode: str, count: int, s3: str, objects_file: Path) -> dict[str, Any]:
    out = subprocess.run(
        python(
            "-m", "bench.packaging", "--child", mode, "--count", str(count), "--s3", s3, "--objects", str(objects_file)
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------ parent


def upload(storage: Storage, first: int, count: int) -> list[tuple[str, int, int]]:
    def put(i: int) -> tuple[str, int, int]:
        data = random.Random(i).randbytes(OBJECT_BYTES)
        storage.client.put_object(storage.bucket, object_key(i), io.BytesIO(data), len(data), "image/png")
        return object_key(i), len(data), zlib.crc32(data)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(put, range(first, first + count)))


def delete(storage: Storage, keys: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: storage.client.remove_object(storage.bucket, key), keys))


def timed(fn: Any, *args: Any) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process, all threads), size."""
    started, cpu = time.perf_counter(), time.process_time()
    size = fn(*args)
    return time.perf_counter() - started, time.process_time() - cpu, int(size)


def run(args: argparse.Namespace) -> int:
    report = Report(args)
    workdir = scratch_dir("bunch-bench-packaging-")
    s3_proc, s3_url = start_s3(workdir)
    try:
        settings = Settings(s3_endpoint=s3_url)
        storage = Storage(settings)
        part = settings.zip_part_size
        asyncio.run(storage.ensure_bucket())
        n = args.size_mb * 1024 * 1024 // OBJECT_BYTES
        started = time.perf_counter()
        objects = upload(storage, 0, n)
        print(f"packaging: uploaded {n} objects of 2 MB in {time.perf_counter() - started:.1f} s", flush=True)
        keys = [k for k, _, _ in objects]
        raw_times, zip_times = [], []
        cpu: dict[str, list[float]] = {"raw": [], "zip": []}
        zip_size = raw_size = 0
        for rep in range(args.reps):
            # Alternate, and swap who goes first, so neither side always runs on a warmer server.
            order = ("raw", "zip") if rep % 2 == 0 else ("zip", "raw")
            for what in order:
                dest = f"bench/out/{what}-{rep}"
                if what == "raw":
                    seconds, used, raw_size = timed(raw_copy, storage, keys, dest, part)
                    raw_times.append(seconds)
                else:
                    seconds, used, zip_size = timed(write_zip, storage, dest, entries(objects), part)
                    zip_times.append(seconds)
                cpu[what].append(used)
                storage.client.remove_object(storage.bucket, dest)
                print(f"    {what} pass {rep}: {seconds:.2f} s, {used:.2f} CPU s", flush=True)
        crc_seconds = None
        if args.unknown_crc:
            crc_seconds, _, _ = timed(write_zip, storage, "bench/out/nocrc", entries(objects, known_crc=False), part)
            storage.client.remove_object(storage.bucket, "bench/out/nocrc")
        raw_best, zip_best = min(raw_times), min(zip_times)
        ratio = raw_best / zip_best
        mb = raw_size / 1024 / 1024
        report.add(
            B3, f"raw copy of {mb:.0f} MB (GET + multipart PUT)", f"{fmt_s(raw_best)} ({mb / raw_best:.0f} MB/s)"
        )
        report.add(B3, f"write_zip of the same {n} objects", f"{fmt_s(zip_best)} ({mb / zip_best:.0f} MB/s)")
        report.add(B3, "ZIP throughput / raw copy throughput", fmt_pct(ratio), "≥ 90 %", ratio >= 0.9)
        gb = mb / 1024
        report.add(
            B3,
            "client CPU per GB: raw copy / write_zip",
            f"{min(cpu['raw']) / gb:.2f} s / {min(cpu['zip']) / gb:.2f} s",
        )
        if crc_seconds is not None:
            report.add(B3, "write_zip, CRC unknown (reads each object twice)", fmt_s(crc_seconds))

        objects_file = workdir / "objects.json"
        small = args.small_mb * 1024 * 1024 // OBJECT_BYTES
        large = args.large_mb * 1024 * 1024 // OBJECT_BYTES
        objects_file.write_text(json.dumps(objects))
        small_zip = worst_of(MEMORY_REPS, "zip", small, s3_url, objects_file)
        naive = measure_child("naive", small, s3_url, objects_file)
        if large > n:
            started = time.perf_counter()
            objects += upload(storage, n, large - n)
            print(f"    uploaded {large - n} more objects in {time.perf_counter() - started:.1f} s", flush=True)
            objects_file.write_text(json.dumps(objects))
        large_zip = worst_of(MEMORY_REPS, "zip", large, s3_url, objects_file)
        delete(storage, [k for k, _, _ in objects])

        flat = large_zip["hwm"] <= small_zip["hwm"] * 1.10
        for result, size_mb in ((small_zip, args.small_mb), (large_zip, args.large_mb)):
            report.add(B3, f"packager peak RSS (VmHWM), {size_mb} MB ZIP", fmt_mb(result["hwm"]))
        report.add(
            B3,
            f"peak RSS growth {args.small_mb} MB → {args.large_mb} MB",
            f"{(large_zip['hwm'] / small_zip['hwm'] - 1) * 100:+.1f} %",
            "flat (≤ +10 %)",
            flat,
        )
        report.add(B3, f"naive in-memory zipfile peak RSS, {args.small_mb} MB", fmt_mb(naive["hwm"]))
        # Both children import the same modules, so their fixed cost cancels out of the ratio; what
        # is left is the archive the naive build holds and the streaming build never does.
        against_naive = small_zip["hwm"] / naive["hwm"]
        report.add(
            B3,
            f"packager / naive in-memory zipfile peak RSS, {args.small_mb} MB",
            f"{against_naive:.2f}",
            "≤ 0.75",
            against_naive <= 0.75,
        )
        crc_line = ""
        if crc_seconds is not None:
            crc_line = f"Without a known CRC (zipper._stored_method reads every object twice): {fmt_s(crc_seconds)}."
        report.note(
            B3,
            f"""moto's S3 server (`moto_server`, in memory) on loopback, objects of 2 MB of random bytes,
part size {part // 1024 // 1024} MB (BUNCH_ZIP_PART_SIZE default). Time: best of {args.reps} alternated passes
each (raw {", ".join(f"{t:.2f}" for t in raw_times)} s; ZIP {", ".join(f"{t:.2f}" for t in zip_times)} s);
archive {zip_size / 1024 / 1024:.1f} MB vs {raw_size / 1024 / 1024:.1f} MB raw. The ZIP entries carry
size and CRC32 as the worker reports them (services/packager/packaging.py zip_entries), so each object
is read once; stream-zip still computes the CRC of every byte to verify it.
{crc_line}

Memory: the highest VmHWM of {MEMORY_REPS} fresh `python -m bench.packaging --child ...` processes
(imports included: VmRSS before the work {fmt_mb(small_zip["rss_before"])}).
write_zip {args.small_mb} MB: {fmt_mb(small_zip["hwm"])} in {small_zip["seconds"]:.1f} s;
{args.large_mb} MB: {fmt_mb(large_zip["hwm"])} in {large_zip["seconds"]:.1f} s;
naive `zipfile` into a BytesIO, then one put_object, {args.small_mb} MB: {fmt_mb(naive["hwm"])}
in {naive["seconds"]:.1f} s (it grows with the archive: ~{args.large_mb} MB and more for {args.large_mb} MB).""",
        )
    finally:
        s3_proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return report.finish([B3])


MEMORY_REPS = 2


def worst_of(reps: int, kind: str, count: int, s3_url: str, objects_file: Path) -> dict[str, Any]:
    """The highest peak of `reps` fresh processes: how much memory to provision is the worst case,
    and one run's peak depends on how minio's part buffers happened to overlap."""
    return max((measure_child(kind, count, s3_url, objects_file) for _ in range(reps)), key=lambda r: r["hwm"])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--size-mb", type=int, default=1000, help="the timed ZIP vs raw copy (2 MB objects)")
    p.add_argument("--small-mb", type=int, default=250, help="peak-RSS case 1")
    p.add_argument("--large-mb", type=int, default=2000, help="peak-RSS case 2")
    p.add_argument("--reps", type=int, default=3, help="alternated passes of each side of the timed case")
    p.add_argument(
        "--no-unknown-crc", dest="unknown_crc", action="store_false", help="skip timing write_zip without known CRCs"
    )
    p.add_argument("--child", choices=["zip", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    p.add_argument("--s3", help=argparse.SUPPRESS)
    p.add_argument("--objects", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    sys.exit(run(args))


if __name__ == "__main__":
    main()
