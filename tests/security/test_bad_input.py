"""Bad input on the real gateway: a clear 4xx with a message, never a 5xx, and nothing stored.

Covered elsewhere and not repeated here: ZIP entries with `../` and absolute names, symbolic
links, nested archives and per-entry bombs (tests/test_datasets.py), group names with slashes,
dots and unicode in downloads (tests/test_downloads.py, with control characters in
tests/security/test_zip_paths.py), the webhook URL checker itself (tests/test_user_webhooks.py).
"""

import asyncio
import io
import json
import random
import socket
import struct
import time
import zipfile
import zlib
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis

from deploy.stack import Stack
from tests.security.conftest import KEY_A, MAX_UPLOAD, MIB, stored_state
from tests.stack_helpers import png_bytes, upload

# --- crafted files ---


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG that claims `width` x `height` pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(64))) + _chunk(b"IEND", b"")
    )


def encoded(fmt: str, frames: int = 1) -> bytes:
    images = [Image.new("RGB", (32, 32), (90 * n % 256, 40, 200)) for n in range(frames)]
    out = io.BytesIO()
    if frames > 1:
        images[0].save(out, fmt, save_all=True, append_images=images[1:])
    else:
        images[0].save(out, fmt)
    return out.getvalue()


def noise(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def zip_of_copies(entries: int, size: int, name: str = "bomb/{:05d}.png") -> bytes:
    """A ZIP of `entries` entries, each `size` zero bytes, deflated once and written `entries`
    times: a ZIP bomb that costs milliseconds to build (zipfile would deflate every copy)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = deflate.compress(bytes(size)) + deflate.flush()
    crc = zlib.crc32(bytes(size))
    out, central = io.BytesIO(), []
    for n in range(entries):
        encoded_name = name.format(n).encode()
        offset = out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(data), size, len(encoded_name), 0))
        out.write(encoded_name + data)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                *(0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(data), size, len(encoded_name), 0, 0, 0, 0, 0, offset),
            )
            + encoded_name
        )
    directory = b"".join(central)
    start = out.tell()
    out.write(directory)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, entries, entries, len(directory), start, 0))
    return out.getvalue()


def build_zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return out.getvalue()


def assert_problem(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail, response.text
    for word in words:
        assert word in detail, (word, detail)
    return detail


# --- uploads ---

UPLOADS: list[tuple[str, bytes, int, str]] = [
    ("empty.png", b"", 422, "the file is empty"),
    ("notes.png", b"just some text, not an image at all", 415, "the file is not an image"),
    ("cut.png", png_bytes(200, 200, noise=True)[:5000], 422, "damaged image"),
    ("bomb.png", png_header_only(30_000, 30_000), 413, "too many pixels"),
    ("wide.png", png_header_only(7000, 7000), 413, "7000x7000 pixels"),
    ("big.png", noise(MAX_UPLOAD + 1), 413, "larger than 2 MB"),
    ("anim.gif", encoded("GIF"), 415, "GIF images are not supported"),
    ("scan.bmp", encoded("BMP"), 415, "BMP images are not supported"),
    ("photo.tiff", encoded("TIFF"), 415, "TIFF images are not supported"),
    ("moving.webp", encoded("WEBP", frames=2), 415, "animated images are not supported"),
    ("moving.png", encoded("PNG", frames=2), 415, "animated images are not supported"),  # APNG
]


@pytest.mark.parametrize(("name", "data", "status", "words"), UPLOADS, ids=[u[0] for u in UPLOADS])
async def test_a_bad_upload_is_refused_by_name_and_nothing_is_stored(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis, name: str, data: bytes, status: int, words: str
) -> None:
    before = await stored_state(api_stack, api_redis)
    # A good image in the same request: a request is stored whole or not at all.
    files = [("files", ("good.png", png_bytes(seed=77), "image/png")), ("files", (name, data, "image/png"))]
    response = await api_a.post("/api/uploads", files=files)
    detail = assert_problem(response, status, words)
    assert detail.startswith(f"{name}: "), detail
    assert await stored_state(api_stack, api_redis) == before


async def test_a_camera_jpeg_with_extra_images_is_a_jpeg_not_an_animation(api_a: httpx.AsyncClient) -> None:
    # MPO: what many phones write as .jpg, the photo followed by a preview or depth image.
    photo, extra = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 15), (0, 0, 0))
    out = io.BytesIO()
    photo.save(out, "MPO", save_all=True, append_images=[extra])
    response = await api_a.post("/api/uploads", files=[("files", ("camera.jpg", out.getvalue(), "image/jpeg"))])
    assert response.status_code == 201, response.text
    (info,) = response.json()["uploads"]
    assert (info["format"], info["width"], info["height"]) == ("jpeg", 40, 30)


def raw_request(url: str, head: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket (for headers httpx would not send as given)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < received.index(b"\r\n\r\n") + 4:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    status = int(received.split(b" ", 2)[1])
    return status, received.split(b"\r\n\r\n", 1)[1]


async def test_an_upload_request_too_large_as_a_whole_is_refused_before_it_is_read(api_stack: Stack) -> None:
    # Claims 300 MiB (more than 100 files at the 2 MiB limit) and sends a few bytes: answered at once.
    head = (
        f"POST /api/uploads HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 314572800\r\n"
    )
    started = time.monotonic()
    status, body = await asyncio.to_thread(raw_request, api_stack.gateway_url, head, b"--b\r\n")
    assert status == 413 and time.monotonic() - started < 5
    assert "larger than" in json.loads(body)["detail"]


# --- datasets ---


async def test_zip_bomb_of_many_small_entries_is_refused_at_once(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis
) -> None:
    # 2,000 entries of 512 KiB zeros: each under the per-entry ratio check, 1,000 MiB from ~1 MiB.
    bomb = zip_of_copies(2000, 512 * 1024)
    assert len(bomb) < 2 * MIB
    before = await stored_state(api_stack, api_redis)
    started = time.monotonic()
    response = await api_a.post("/api/datasets", files=[("files", ("bomb.zip", bomb, "application/zip"))])
    assert_problem(response, 413, "1000 MB", "ZIP bomb")
    assert time.monotonic() - started < 10
    assert await stored_state(api_stack, api_redis) == before


async def test_zip_entry_names_that_escape_in_other_ways_are_refused(api_a: httpx.AsyncClient) -> None:
    good = png_bytes(20, 20, seed=41)
    entries = [
        ("ok.png", good),
        ("C:/windows/evil.png", good),
        ("..\\back.png", good),
        ("a/../../up.png", good),
        ("//server/share.png", good),
        ("inner.png", build_zip([("x.png", good)])),  # an archive under an image's name
    ]
    response = await api_a.post(
        "/api/datasets", files=[("files", ("mixed.zip", build_zip(entries), "application/zip"))]
    )
    assert response.status_code == 201, response.text
    assert response.json()["count"] == 1
    assert response.json()["rejected"] == [
        {"name": "C:/windows/evil.png", "reason": "absolute path"},
        {"name": "..\\back.png", "reason": "path leaves the archive (..)"},
        {"name": "a/../../up.png", "reason": "path leaves the archive (..)"},
        {"name": "//server/share.png", "reason": "absolute path"},
        {"name": "inner.png", "reason": "the file is not an image"},
    ]


async def test_a_zip_entry_that_lies_about_its_size_is_not_read_past_it(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis
) -> None:
    liar = bytearray(zip_of_copies(1, 5 * MIB, name="liar.png"))
    # The central directory now claims 100 bytes for 5 MiB of deflated zeros.
    directory = liar.index(b"PK\x01\x02")
    liar[directory + 24 : directory + 28] = struct.pack("<I", 100)
    assert zipfile.ZipFile(io.BytesIO(bytes(liar))).infolist()[0].file_size == 100
    before = await stored_state(api_stack, api_redis)
    response = await api_a.post("/api/datasets", files=[("files", ("liar.zip", bytes(liar), "application/zip"))])
    assert_problem(response, 422, "No usable image", "liar.png: unreadable entry")
    assert await stored_state(api_stack, api_redis) == before


# --- JSON bodies ---


def semi_auto(**changes: Any) -> dict[str, Any]:
    return {"mode": "semi_auto", "prompts": ["a fox"], "images_per_prompt": 1, **changes}


def automatic(**changes: Any) -> dict[str, Any]:
    return {"mode": "automatic", "base_prompt": "watercolor", "input_ids": ["0" * 32], **changes}


BAD_JOBS: list[tuple[str, dict[str, Any], str]] = [
    ("too many prompts", semi_auto(prompts=[f"p{n}" for n in range(101)]), "Too many prompts: 101; at most 100"),
    ("a prompt too long", semi_auto(prompts=["x" * 4001]), "at most 4000 characters"),
    ("negative count", semi_auto(images_per_prompt=-5), "images_per_prompt"),
    ("huge count", semi_auto(images_per_prompt=10**30), "images_per_prompt"),
    ("count as a boolean", semi_auto(images_per_prompt=True), "images_per_prompt"),
    ("count as a string", semi_auto(images_per_prompt="5"), "images_per_prompt"),
    (
        "too many images",
        semi_auto(prompts=[f"p{n}" for n in range(11)], images_per_prompt=10_000),
        "asks for 110000 images",
    ),
    ("negative variations", automatic(variations_per_image=-1), "variations_per_image"),
    ("too many variations", automatic(variations_per_image=17), "variations_per_image"),
    ("too many inputs", automatic(input_ids=[f"{n:032x}" for n in range(20_001)]), "Too many input images: 20001"),
    ("priority below range", semi_auto(priority=-1), "priority"),
    ("priority above range", semi_auto(priority=1001), "priority"),
    ("huge priority", semi_auto(priority=2**70), "priority"),
    ("malformed upload id", semi_auto(reference_ids=["../../etc/passwd"]), "reference_ids"),
    ("group name too long", semi_auto(group="g" * 201), "group"),
    ("blank group name", semi_auto(group="   "), "group"),
    ("unknown field", semi_auto(admin=True), "admin"),
    ("dataset id too long", automatic(input_ids=[], dataset_id="d" * 65), "dataset_id"),
]


@pytest.mark.parametrize(("case", "body", "words"), BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
async def test_a_bad_job_request_gets_422_with_a_message_and_queues_nothing(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis, case: str, body: dict[str, Any], words: str
) -> None:
    before = await stored_state(api_stack, api_redis)
    assert_problem(await api_a.post("/api/jobs", json=body), 422, words)
    assert await stored_state(api_stack, api_redis) == before


async def test_oversized_and_malformed_bodies_get_4xx_with_a_message(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis
) -> None:
    before = await stored_state(api_stack, api_redis)
    five_mb = semi_auto(prompts=["x" * 4000] * 1300)
    raw = json.dumps(five_mb).encode()
    assert len(raw) > 5_000_000
    assert_problem(await api_a.post("/api/jobs", content=raw, headers={"content-type": "application/json"}), 413)

    async def chunks() -> Any:  # no Content-Length: the limit holds while the body streams in
        for start in range(0, len(raw), 65536):
            yield raw[start : start + 65536]

    streamed = await api_a.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(streamed, 413, "larger than")

    deep = ("[" * 100_000 + "]" * 100_000).encode()
    response = await api_a.post("/api/jobs", content=deep, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422) and response.json()["detail"]
    not_utf8 = await api_a.post("/api/jobs", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert not_utf8.status_code in (400, 422) and not_utf8.json()["detail"]
    truncated = await api_a.post("/api/jobs", content=raw[:1000], headers={"content-type": "application/json"})
    assert_problem(truncated, 422)
    big_webhook = await api_a.post(f"/internal/runpod/webhook?token={'x~' * 3}y", content=bytes(2 * MIB))
    assert big_webhook.status_code in (403, 413)  # the token is checked first
    assert await stored_state(api_stack, api_redis) == before


async def test_out_of_range_changes_to_a_job_get_422(api_a: httpx.AsyncClient, api_redis: Redis) -> None:
    refs = await upload(api_a, [png_bytes(seed=3)])
    accepted = await api_a.post("/api/jobs", json=semi_auto(reference_ids=refs, images_per_prompt=4))
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    for priority in (-1, 1001, 10**20, True, "5"):
        assert_problem(await api_a.patch(f"/api/jobs/{job_id}", json={"priority": priority}), 422, "priority")
    for indices in ([-1], [4], [2**63], [True]):
        assert_problem(await api_a.post(f"/api/jobs/{job_id}/redo", json={"indices": indices}), 422, "indices")
    assert_problem(await api_a.post(f"/api/jobs/{job_id}/redo", json={"indices": list(range(10_001))}), 422)
    status = (await api_a.get(f"/api/jobs/{job_id}/status")).json()
    assert status["priority"] == 10 and status["status"] == "queued"


@pytest.mark.parametrize(
    "cursor",
    ["99999999999999999999", "18446744073709551615-18446744073709551615", "-1", "1-2-3", "yesterday", " 5"],
)
async def test_bad_last_event_ids_get_422_not_a_broken_stream(api_a: httpx.AsyncClient, cursor: str) -> None:
    response = await api_a.get("/api/events", params={"last_event_id": cursor})
    assert_problem(response, 422, "Last-Event-ID")


# --- webhook URLs (no SSRF) ---


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:6379/", "loopback"),
        ("http://localhost:8000/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/hook", "loopback"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http://0.0.0.0/hook", "unspecified"),
        ("http://100.64.0.1/hook", "non-public"),
    ],
)
async def test_webhook_urls_to_non_public_addresses_are_refused_at_submit(
    api_stack: Stack, api_a: httpx.AsyncClient, api_redis: Redis, url: str, words: str
) -> None:
    before = await stored_state(api_stack, api_redis)
    assert_problem(await api_a.post("/api/jobs", json=semi_auto(webhook_url=url)), 422, "webhook_url", words)
    assert await stored_state(api_stack, api_redis) == before
