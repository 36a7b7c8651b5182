"""The ZIP writer against the real moto S3 server: archive validity, bounded memory, safe names."""

import asyncio
import io
import json
import os
import tracemalloc
import zipfile
import zlib
from datetime import UTC, datetime

import pytest
from minio.error import S3Error
from PIL import Image

from services.packager.zipper import ObjectMismatch, ZipEntry, safe_zip_path, write_zip
from shared.storage import Storage

MIB = 1024 * 1024
PART_SIZE = 5 * MIB  # S3's minimum, so the small archives here still exercise several parts
WHEN = datetime(2025, 3, 4, 5, 6, 8, tzinfo=UTC)


def _png(index: int) -> bytes:
    # Noise so PNG cannot shrink the image to nothing and the archive spans more than one part.
    image = Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3))
    image.putpixel((0, 0), (index, index, index))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def test_images_and_manifest_round_trip(storage: Storage) -> None:
    images = {f"zt/img/{i:02d}.png": _png(i) for i in range(20)}
    await asyncio.gather(*(storage.put_bytes(k, v, "image/png") for k, v in images.items()))
    manifest = {"job": "j1", "images": sorted(images)}
    manifest_bytes = json.dumps(manifest, indent=2).encode()

    def entries() -> "list[ZipEntry]":
        items = [
            ZipEntry(
                name=safe_zip_path("cats & dogs", key.rsplit("/", 1)[1]),
                object_key=key,
                modified_at=WHEN,
            )
            for key in images
        ]
        items.append(ZipEntry(name="manifest.json", data=manifest_bytes, modified_at=WHEN, compress=True))
        return items

    size = await asyncio.to_thread(write_zip, storage, "zt/out.zip", iter(entries()), PART_SIZE)
    body = await storage.get_bytes("zt/out.zip")
    assert size == len(body)
    assert size > PART_SIZE  # really went through a multipart upload

    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names == [f"cats & dogs/{i:02d}.png" for i in range(20)] + ["manifest.json"]
        for key, data in images.items():
            info = archive.getinfo(f"cats & dogs/{key.rsplit('/', 1)[1]}")
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == (2025, 3, 4, 5, 6, 8)
            assert archive.read(info) == data
        manifest_info = archive.getinfo("manifest.json")
        assert manifest_info.compress_type == zipfile.ZIP_DEFLATED
        assert json.loads(archive.read(manifest_info)) == manifest
    # ZIP64 end-of-central-directory record: offsets beyond 4 GiB stay representable.
    assert b"PK\x06\x06" in body[-200:]


async def test_small_archive_single_put(storage: Storage) -> None:
    entries = [ZipEntry(name="a.txt", data=b"hello", modified_at=datetime(2024, 1, 1))]
    size = await asyncio.to_thread(write_zip, storage, "zt/small.zip", entries, PART_SIZE)
    with zipfile.ZipFile(io.BytesIO(await storage.get_bytes("zt/small.zip"))) as archive:
        assert archive.read("a.txt") == b"hello"
    assert size == len(await storage.get_bytes("zt/small.zip"))


async def test_memory_stays_bounded_by_part_size(storage: Storage) -> None:
    count, object_size = 40, 5 * MIB
    keys = [f"zt/big/{i:02d}.bin" for i in range(count)]
    semaphore = asyncio.Semaphore(8)

    async def upload(key: str) -> None:
        async with semaphore:
            await storage.put_bytes(key, os.urandom(object_size), "application/octet-stream")

    await asyncio.gather(*(upload(k) for k in keys))

    def generate() -> "list[ZipEntry]":
        return [ZipEntry(name=k.rsplit("/", 1)[1], object_key=k, modified_at=WHEN) for k in keys]

    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        size = await asyncio.to_thread(write_zip, storage, "zt/big.zip", generate(), PART_SIZE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = peak - baseline
    print(f"zip {size / MIB:.1f} MiB, peak traced growth {grown / MIB:.1f} MiB")
    assert size > count * object_size
    # minio's put_object uploads up to 3 parts concurrently (num_parallel_uploads=3) while it
    # assembles the next one, and assembling briefly needs 2 copies (one_byte + data, then
    # [:-1]): 5 parts worst case. With sequential uploads the same run measures ~3 parts.
    assert grown < 5 * PART_SIZE + 10 * MIB
    assert grown < size / 5

    # The archive must still be valid: check the central directory and a couple of members.
    body = await storage.get_bytes("zt/big.zip")
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [k.rsplit("/", 1)[1] for k in keys]
        assert all(i.file_size == object_size and i.compress_type == zipfile.ZIP_STORED for i in infos)
        for key in (keys[0], keys[-1]):
            assert archive.read(key.rsplit("/", 1)[1]) == await storage.get_bytes(key)


async def test_failure_leaves_no_object(storage: Storage) -> None:
    await storage.put_bytes("zt/fail/present.bin", os.urandom(6 * MIB), "application/octet-stream")
    entries = [
        ZipEntry(name="present.bin", object_key="zt/fail/present.bin", modified_at=WHEN),
        ZipEntry(name="missing.bin", object_key="zt/fail/missing.bin", modified_at=WHEN),
    ]
    with pytest.raises(S3Error):
        await asyncio.to_thread(write_zip, storage, "zt/fail.zip", entries, PART_SIZE)
    assert not await storage.exists("zt/fail.zip")


def test_entry_requires_exactly_one_source() -> None:
    with pytest.raises(ValueError):
        ZipEntry(name="x", modified_at=WHEN)
    with pytest.raises(ValueError):
        ZipEntry(name="x", object_key="k", data=b"d", modified_at=WHEN)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("../../etc/passwd",), "_.._etc_passwd"),
        (("/abs",), "_abs"),
        (("a/b",), "a_b"),
        (("dots..",), "dots"),
        (("名前",), "名前"),
        (("tab\there",), "tab_here"),
        (("",), "_"),
        ((), "_"),
        (("group", "..", "x.png"), "group/_/x.png"),
        (("C:\\win\\path",), "C__win_path"),
        (("CON",), "_CON"),
        (("e\u0301",), "\u00e9"),  # NFC
        (("a\u202egnp.exe",), "a_gnp.exe"),
    ],
)
def test_safe_zip_path(parts: tuple[str, ...], expected: str) -> None:
    assert safe_zip_path(*parts) == expected


@pytest.mark.parametrize(
    "raw", ["../../etc/passwd", "/abs", "a/b", "dots..", "名前", "tab\there", "", "..", ".", "\x00\x1f\x7f"]
)
def test_safe_zip_path_invariants(raw: str) -> None:
    for path in (safe_zip_path(raw), safe_zip_path("group", raw), safe_zip_path(raw, raw)):
        assert path and not path.startswith("/")
        assert "\\" not in path
        components = path.split("/")
        assert all(c not in ("", ".", "..") for c in components)
        assert all(len(c) <= 100 for c in components)
        assert not any(ch < " " or ch == "\x7f" for ch in path)


def test_safe_zip_path_truncates_keeping_extension() -> None:
    name = safe_zip_path("x" * 300 + ".png")
    assert len(name) == 100 and name.endswith(".png")
    assert len(safe_zip_path("y" * 300)) == 100


@pytest.mark.parametrize(
    ("size_change", "crc_change", "expected"),
    [(0, 1, "CRC-32"), (-1, 0, "more than"), (1, 0, "bytes, ")],
)
async def test_an_object_unlike_its_recorded_size_and_crc_is_named(
    storage: Storage, size_change: int, crc_change: int, expected: str
) -> None:
    # The packager fails just that image when told which object it was (stream-zip's own error
    # does not say); the archive is not written.
    data = os.urandom(MIB)
    await storage.put_bytes("zt/mismatch/good.bin", data, "application/octet-stream")
    await storage.put_bytes("zt/mismatch/bad.bin", data, "application/octet-stream")
    crc = zlib.crc32(data)
    entries = [
        ZipEntry(name="good.bin", object_key="zt/mismatch/good.bin", modified_at=WHEN, size=MIB, crc32=crc),
        ZipEntry(
            name="bad.bin",
            object_key="zt/mismatch/bad.bin",
            modified_at=WHEN,
            size=MIB + size_change,
            crc32=crc ^ crc_change,
        ),
    ]
    with pytest.raises(ObjectMismatch) as raised:
        await asyncio.to_thread(write_zip, storage, "zt/mismatch.zip", entries, PART_SIZE)
    assert raised.value.object_key == "zt/mismatch/bad.bin"
    assert expected in raised.value.detail
    assert not await storage.exists("zt/mismatch.zip")
