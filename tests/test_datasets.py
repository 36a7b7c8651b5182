"""POST /api/datasets on the real stack: every ZIP entry judged, many files, 2,000 images in bounded memory."""

import hashlib
import io
import random
import stat
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis

from deploy.stack import Stack
from shared import keys
from shared.stores.datasets import DatasetStore
from tests.stack_helpers import client, png_bytes, redis_of, running_stack, wait_final

KEY_A, KEY_B = "key-a", "key-b"
MIB = 1024 * 1024
MAX_UPLOAD = 2 * MIB  # small limits, so refusing oversized entries needs no large test data
MAX_DATASET = 6 * MIB
MAX_ENTRIES = 2100
# The 2,000-image job's 500 runs, 16 at a time: the runpod SDK's worker pauses 1 s whenever it is
# full, so at the default cap of 5 the job takes 100 such waves (~100 s) and proves nothing more.
CAPACITY = 16


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-datasets-",
        api_keys=f"{KEY_A}:project-a,{KEY_B}:project-b",
        services=("gateway",),
        runpod_workers=CAPACITY,
        service_env={
            "BUNCH_MAX_CONCURRENCY": str(CAPACITY),
            "BUNCH_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "BUNCH_MAX_DATASET_BYTES": str(MAX_DATASET),
            "BUNCH_MAX_DATASET_ENTRIES": str(MAX_ENTRIES),
        },
    ) as stack:
        yield stack


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_A) as api:
        api.timeout = httpx.Timeout(120)
        yield api


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    async with redis_of(stack) as redis:
        yield redis


def client_for(api: httpx.AsyncClient, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=api.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def upload_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def noise(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def tiny_png(n: int) -> bytes:
    """A distinct 16x16 PNG per n (distinct content: uploads are stored by hash)."""
    image = Image.new("RGB", (16, 16), (n % 256, n // 256, 99))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def symlink_entry(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the mode bits in external_attr count
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def build_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


async def post_zip(api: httpx.AsyncClient, data: bytes, name: str = "dataset.zip") -> httpx.Response:
    return await api.post("/api/datasets", files=[("files", (name, data, "application/zip"))])


async def test_zip_entries_are_each_checked_and_bad_ones_reported(api: httpx.AsyncClient, redis: Redis) -> None:
    good = [png_bytes(24, 24, seed=s) for s in range(1, 6)]
    inner = build_zip([("x.png", good[0])])
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [
        ("photos/", b""),  # directories are skipped, not reported
        ("photos/a.png", good[0]),
        ("../evil.png", good[1]),
        ("/abs.png", good[1]),
        symlink_entry("photos/link.png", "/etc/passwd"),
        ("photos/b.png", good[1]),
        ("inner.zip", inner),
        ("notes.png", b"just some text, not an image"),
        ("bomb.png", bytes(int(1.5 * MIB))),  # zeros: deflates about 1000:1
        ("huge.png", noise(MAX_UPLOAD + 1)),  # incompressible, over the per-file limit
        ("photos/c.png", good[2]),
        ("__MACOSX/photos/._a.png", b"\x00\x05\x16\x07resource fork"),  # macOS litter, skipped
        ("again.png", good[0]),  # the same image twice is one input
        ("d.png", good[3]),
        ("e.jpg.png", good[4]),
    ]
    response = await post_zip(api, build_zip(entries))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["count"] == 5
    assert body["rejected"] == [
        {"name": "../evil.png", "reason": "path leaves the archive (..)"},
        {"name": "/abs.png", "reason": "absolute path"},
        {"name": "photos/link.png", "reason": "symbolic link"},
        {"name": "inner.zip", "reason": "nested archive (archives inside the ZIP are not unpacked)"},
        {"name": "notes.png", "reason": "the file is not an image"},
        {"name": "bomb.png", "reason": "suspicious compression ratio (possible ZIP bomb)"},
        {"name": "huge.png", "reason": "the file is larger than 2 MB"},
        {"name": "again.png", "reason": "same image as photos/a.png"},
    ]
    # Archive order, and each input is an upload of this project like POST /api/uploads makes.
    expected = [upload_id(data) for data in (good[0], good[1], good[2], good[3], good[4])]
    assert await DatasetStore(redis).input_ids("project-a", body["id"]) == expected
    for input_id in expected:
        assert await redis.exists(keys.upload("project-a", input_id))
    assert await DatasetStore(redis).input_ids("project-b", body["id"]) is None
    assert await DatasetStore(redis).input_ids("project-a", "nope") is None

    details = await api.get(f"/api/datasets/{body['id']}")
    assert details.status_code == 200
    assert details.json()["count"] == 5 and details.json()["id"] == body["id"]
    async with client_for(api, KEY_B) as other:
        assert (await other.get(f"/api/datasets/{body['id']}")).status_code == 404


async def test_dataset_ids_are_checked_before_they_name_a_key(api: httpx.AsyncClient, redis: Redis) -> None:
    dataset = await post_zip(api, build_zip([("a.png", png_bytes(20, 20, seed=77))]))
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    # `<id>:inputs` names the dataset's list of inputs: read as a dataset it was a WRONGTYPE error.
    for malformed in (f"{dataset_id}:inputs", dataset_id.upper(), f"{dataset_id}*", "*", dataset_id[:-1]):
        response = await api.get(f"/api/datasets/{malformed}")
        assert response.status_code == 404, (malformed, response.text)
        assert response.json()["detail"] == "No such dataset in this project."
        assert await DatasetStore(redis).input_ids("project-a", malformed) is None
    assert (await api.get(f"/api/datasets/{dataset_id}")).status_code == 200
    assert await DatasetStore(redis).input_ids("project-a", dataset_id) == [upload_id(png_bytes(20, 20, seed=77))]


async def test_a_job_naming_a_dataset_keeps_it_from_retention(api: httpx.AsyncClient, redis: Redis) -> None:
    dataset = await post_zip(api, build_zip([("a.png", png_bytes(20, 20, seed=79))]))
    assert dataset.status_code == 201, dataset.text
    dataset_id = dataset.json()["id"]
    await redis.zadd(keys.DATASETS_BY_USE, {dataset_id: 1.0})  # as if unused for decades
    before = time.time()
    job = await api.post("/api/jobs", json={"mode": "automatic", "base_prompt": "ink", "dataset_id": dataset_id})
    assert job.status_code == 202, job.text
    used_at = await redis.zscore(keys.DATASETS_BY_USE, dataset_id)
    assert used_at is not None and used_at >= before - 1
    # A job refused as a whole (here: over the prompt limit) leaves the dataset's last use alone.
    await redis.zadd(keys.DATASETS_BY_USE, {dataset_id: 1.0})
    refused = await api.post(
        "/api/jobs", json={"mode": "automatic", "base_prompt": "x" * 100_000, "dataset_id": dataset_id}
    )
    assert refused.status_code == 422, refused.text
    assert await redis.zscore(keys.DATASETS_BY_USE, dataset_id) == 1.0


async def test_copies_in_many_files_are_reported_and_checked_once(api: httpx.AsyncClient, redis: Redis) -> None:
    good, bad = png_bytes(20, 20, seed=78), b"not an image at all"
    named = [("a.png", good), ("bad.png", bad), ("b.png", good), ("bad-again.png", bad), ("c.png", good)]
    files = [("files", (name, data, "image/png")) for name, data in named]
    response = await api.post("/api/datasets", files=files)
    assert response.status_code == 201, response.text
    assert response.json()["count"] == 1
    # A copy of a refused file is refused for the same reason, without being checked again.
    assert response.json()["rejected"] == [
        {"name": "bad.png", "reason": "the file is not an image"},
        {"name": "b.png", "reason": "same image as a.png"},
        {"name": "bad-again.png", "reason": "the file is not an image"},
        {"name": "c.png", "reason": "same image as a.png"},
    ]
    assert await DatasetStore(redis).input_ids("project-a", response.json()["id"]) == [upload_id(good)]


async def test_many_files_make_a_dataset_too(api: httpx.AsyncClient, redis: Redis) -> None:
    images = [png_bytes(20, 20, seed=s) for s in range(10, 14)]
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    files.insert(2, ("files", ("readme.png", b"not an image", "image/png")))
    files.append(("files", ("more.zip", build_zip([("z.png", images[0])]), "application/zip")))
    response = await api.post("/api/datasets", files=files)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["count"] == 4
    assert body["rejected"] == [
        {"name": "readme.png", "reason": "the file is not an image"},
        {"name": "more.zip", "reason": "an archive among other files (send a ZIP on its own)"},
    ]
    assert await DatasetStore(redis).input_ids("project-a", body["id"]) == [upload_id(data) for data in images]


async def test_unusable_uploads_get_clear_client_errors(api: httpx.AsyncClient) -> None:
    nothing = await post_zip(api, build_zip([("a.txt", b"text"), ("../b.png", png_bytes(seed=3))]))
    assert nothing.status_code == 422
    assert nothing.json()["detail"] == (
        "No usable image in the upload. a.txt: the file is not an image; ../b.png: path leaves the archive (..)"
    )

    not_zip = await post_zip(api, b"PK\x03\x04 but not really a zip")
    assert not_zip.status_code == 422 and "not a readable ZIP archive" in not_zip.json()["detail"]

    # Each entry is under the per-file limit, but together they exceed the dataset's total.
    too_much = build_zip([(f"n{i}.png", noise(int(1.9 * MIB), seed=i)) for i in range(4)])
    refused = await post_zip(api, too_much)
    assert refused.status_code == 413
    assert refused.json()["detail"] == "The archive unpacks to 7 MB; at most 6 MB per dataset."

    # Refused from the end record alone, before zipfile builds an object per entry.
    crowded = await post_zip(api, build_zip([(f"d{i}/", b"") for i in range(MAX_ENTRIES + 1)]))
    assert crowded.status_code == 413
    assert crowded.json()["detail"] == f"The archive has {MAX_ENTRIES + 1} entries; at most {MAX_ENTRIES}."

    missing = await api.post("/api/datasets", data={"name": "x"})
    assert missing.status_code == 422 and "files" in missing.json()["detail"]
    async with httpx.AsyncClient(base_url=api.base_url) as anonymous:
        assert (await anonymous.post("/api/datasets", files=[("files", ("a.png", b"x"))])).status_code == 401


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_2000_image_dataset_is_accepted_quickly_in_bounded_memory(
    stack: Stack, api: httpx.AsyncClient, redis: Redis
) -> None:
    images: list[bytes] = []
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for n in range(2000):
            data = tiny_png(n)
            images.append(data)
            archive.writestr(f"set/{n:04d}.png", data)
    started = time.monotonic()
    response = await post_zip(api, out.getvalue(), "big.zip")
    elapsed = time.monotonic() - started
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["count"] == 2000 and body["rejected"] == []
    assert await DatasetStore(redis).input_ids("project-a", body["id"]) == [upload_id(data) for data in images]
    gateway = stack.processes["gateway-0"].popen
    assert gateway is not None
    peak = peak_rss_mib(gateway.pid)
    print(f"2,000-image dataset: {elapsed:.1f}s, gateway peak RSS {peak:.0f} MiB")
    assert elapsed < 30
    assert peak < 200


async def test_a_2000_image_dataset_job_runs_to_completion(stack: Stack, api: httpx.AsyncClient) -> None:
    for service in ("dispatcher", "packager"):
        if f"{service}-0" not in stack.processes:
            stack.start_service(service)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for n in range(2000):
            archive.writestr(f"in/{n:04d}.png", tiny_png(10_000 + n))
    dataset = (await post_zip(api, out.getvalue(), "inputs.zip")).json()
    assert dataset["count"] == 2000
    started = time.monotonic()
    response = await api.post(
        "/api/jobs", json={"mode": "automatic", "base_prompt": "pencil sketch", "dataset_id": dataset["id"]}
    )
    accepted_in = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert accepted_in < 3, f"accepted in {accepted_in:.1f}s"
    status = await wait_final(api, response.json()["id"], stack, within=240)
    assert status["status"] == "completed", status
    assert status["progress"]["images_succeeded"] == 2000 and status["progress"]["runs_done"] == 500
    unknown = await api.post("/api/jobs", json={"mode": "automatic", "base_prompt": "x", "dataset_id": "nope"})
    assert unknown.status_code == 422 and "dataset_id" in unknown.json()["detail"]
