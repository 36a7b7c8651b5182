"""What the configured Gemini model takes, enforced by the real gateway (shared/gemini_models.py).

Two gateway processes share one Redis and one S3 server: replica 0 runs the default model
(gemini-2.5-flash-image), replica 1 has BUNCH_GEMINI_MODEL=gemini-3-pro-image-preview. Nothing
dispatches, so every accepted job stays queued. Limits no real model has (a lower request limit, a
missing aspect ratio) are checked through `submit` itself, with a model spec of the test's own,
against the same Redis and uploads.
"""

import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from deploy.stack import Stack
from services.gateway.deps import Services
from services.gateway.images import HeifError, heif_format, read_heif
from services.gateway.submissions import submit
from shared import keys
from shared.errors import Invalid
from shared.gemini_models import FLASH_IMAGE, PRO_IMAGE, spec_for
from shared.models import AutomaticJobRequest, GenerationParams, SemiAutoJobRequest
from shared.redis_connection import connect
from shared.settings import Settings
from shared.storage import Storage
from tests.stack_helpers import png_bytes, running_stack

KEY = "model-limits-key"
PROJECT = "limits"
MAX_PIXELS = 40_000_000  # the default BUNCH_MAX_UPLOAD_PIXELS


# --- HEIC files, assembled box by box (ISO/IEC 14496-12 boxes, ISO/IEC 23008-12 items) ---


def box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def full_box(kind: bytes, payload: bytes, version: int = 0, flags: int = 0) -> bytes:
    return box(kind, struct.pack(">I", version << 24 | flags) + payload)


def heif_file(
    width: int,
    height: int,
    brands: tuple[bytes, ...] = (b"heic", b"mif1", b"heic"),
    thumbnail: tuple[int, int] = (160, 120),
) -> bytes:
    """ftyp, then meta with the primary item 1 and a thumbnail item 2. The thumbnail's size comes
    first among the properties and in the associations, so only a parser that follows the primary
    item's association finds the image's own size."""
    ftyp = box(b"ftyp", brands[0] + bytes(4) + b"".join(brands[1:]))
    hdlr = full_box(b"hdlr", bytes(4) + b"pict" + bytes(12) + b"\0")
    pitm = full_box(b"pitm", struct.pack(">H", 1))
    ipco = box(
        b"ipco",
        full_box(b"ispe", struct.pack(">II", *thumbnail)) + full_box(b"ispe", struct.pack(">II", width, height)),
    )
    # entry_count, then per item: id, association count, associations (top bit: essential).
    ipma = full_box(b"ipma", struct.pack(">IHBBHBB", 2, 2, 1, 0x81, 1, 1, 0x82))
    meta = full_box(b"meta", hdlr + pitm + box(b"iprp", ipco + ipma))
    return ftyp + meta + box(b"mdat", bytes(256))


# --- the stack ---


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack("bunch-model-limits-", api_keys=f"{KEY}:{PROJECT}", services=("gateway",)) as stack:
        stack.start_service("gateway", replica=1, extra_env={"BUNCH_GEMINI_MODEL": PRO_IMAGE})
        yield stack


def _client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(keepalive_expiry=2)  # as tests/stack_helpers.client, for the same reason
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30, limits=limits)


@pytest.fixture
async def flash(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(stack.gateway_url_of(0)) as api:
        yield api


@pytest.fixture
async def pro(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(stack.gateway_url_of(1)) as api:
        yield api


@pytest.fixture
async def services(stack: Stack) -> AsyncIterator[Services]:
    """The gateway's own services, in the test, on the stack's Redis and S3."""
    settings = Settings(redis_url=stack.redis_url, s3_endpoint=stack.s3_url, api_keys=f"{KEY}:{PROJECT}")
    redis: Redis = connect(settings)
    try:
        yield Services.build(settings, redis, Storage(settings))
    finally:
        await redis.aclose()


async def uploaded(api: httpx.AsyncClient, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    response = await api.post("/api/uploads", files=[("files", (name, data, "image/png")) for name, data in files])
    assert response.status_code == 201, response.text
    return list(response.json()["uploads"])


async def upload_ids(api: httpx.AsyncClient, images: list[bytes]) -> list[str]:
    return [info["id"] for info in await uploaded(api, [(f"{n}.png", data) for n, data in enumerate(images)])]


def semi_auto(references: list[str], **extra: Any) -> dict[str, Any]:
    return {"mode": "semi_auto", "prompts": ["a fox"], "reference_ids": references, "images_per_prompt": 1, **extra}


def refused(response: httpx.Response, *words: str) -> str:
    assert response.status_code == 422, response.text
    detail = str(response.json()["detail"])
    for word in words:
        assert word in detail, (word, detail)
    return detail


# --- generation parameters ---


async def test_flash_image_refuses_image_size_and_says_why(flash: httpx.AsyncClient) -> None:
    (ref,) = await upload_ids(flash, [png_bytes(seed=1)])
    for body in (
        semi_auto([ref], params={"image_size": "2K"}),
        {"mode": "automatic", "base_prompt": "in watercolour", "input_ids": [ref], "params": {"image_size": "1K"}},
    ):
        refused(
            await flash.post("/api/jobs", json=body),
            "gemini-2.5-flash-image does not take image_size; it makes one resolution per aspect ratio",
        )
    accepted = await flash.post("/api/jobs", json=semi_auto([ref], params={"aspect_ratio": "21:9"}))
    assert accepted.status_code == 202, accepted.text


async def test_pro_image_takes_every_image_size(pro: httpx.AsyncClient) -> None:
    (ref,) = await upload_ids(pro, [png_bytes(seed=2)])
    for size in ("1K", "2K", "4K"):
        response = await pro.post(
            "/api/jobs", json=semi_auto([ref], params={"image_size": size, "aspect_ratio": "16:9"})
        )
        assert response.status_code == 202, response.text


async def test_an_aspect_ratio_the_model_lacks_is_refused_with_those_it_has(services: Services) -> None:
    square_only = replace(spec_for(FLASH_IMAGE), aspect_ratios=("1:1", "4:3"))
    job = SemiAutoJobRequest(
        mode="semi_auto", prompts=["a fox"], images_per_prompt=1, params=GenerationParams(aspect_ratio="21:9")
    )
    with pytest.raises(Invalid) as caught:
        await submit(services, PROJECT, job, model=square_only)
    assert caught.value.message == "params.aspect_ratio '21:9': gemini-2.5-flash-image takes 1:1, 4:3."
    square = job.model_copy(update={"params": GenerationParams(aspect_ratio="4:3")})
    assert (await submit(services, PROJECT, square, model=square_only)).status == "queued"


# --- how many references ---


async def test_fourteen_references_under_pro_image_and_at_most_three_under_flash_image(
    flash: httpx.AsyncClient, pro: httpx.AsyncClient
) -> None:
    refs = await upload_ids(pro, [png_bytes(seed=10 + n) for n in range(15)])
    accepted = await pro.post("/api/jobs", json=semi_auto(refs[:14], params={"image_size": "2K"}))
    assert accepted.status_code == 202, accepted.text
    refused(await pro.post("/api/jobs", json=semi_auto(refs)), "15", "gemini-3-pro-image-preview takes at most 14")

    accepted = await flash.post("/api/jobs", json=semi_auto(refs[:3]))
    assert accepted.status_code == 202, accepted.text
    detail = refused(await flash.post("/api/jobs", json=semi_auto(refs[:4])))
    assert detail == "Too many reference images: 4; gemini-2.5-flash-image takes at most 3."


async def test_the_services_own_reference_limit_applies_when_lower(services: Services) -> None:
    lower = replace(services, settings=services.settings.model_copy(update={"max_references": 2}))
    job = SemiAutoJobRequest(mode="semi_auto", prompts=["a fox"], images_per_prompt=1, reference_ids=["a" * 32] * 3)
    with pytest.raises(Invalid) as caught:
        await submit(lower, PROJECT, job, model=spec_for(PRO_IMAGE))
    assert caught.value.message == (
        "Too many reference images: 3; at most 2 here (the service's limit; gemini-3-pro-image-preview takes up to 14)."
    )


# --- request size ---


async def test_references_whose_request_would_pass_the_inline_limit_are_refused(
    pro: httpx.AsyncClient, services: Services
) -> None:
    # Noise does not compress: three PNGs of some 120-150 KB, the last the largest, far below any
    # upload limit.
    images = [(f"noise{n}.png", png_bytes(200 + 10 * n, 200, seed=n, noise=True)) for n in range(3)]
    infos = await uploaded(pro, images)
    ids, sizes = [info["id"] for info in infos], [info["bytes"] for info in infos]
    assert sizes[0] < sizes[1] < sizes[2]
    prompt = ", ".join(["a fox in the snow"] * 20)
    model = spec_for(PRO_IMAGE)
    two, three = model.request_bytes(prompt, sizes[:2]), model.request_bytes(prompt, sizes)
    assert two < sum(sizes) * 4 // 3 < three  # the references' base64, not their bytes, count
    small = replace(model, max_request_bytes=three - 1)
    job = SemiAutoJobRequest(mode="semi_auto", prompts=["short", prompt], images_per_prompt=1, reference_ids=ids[:2])
    assert (await submit(services, PROJECT, job, model=small)).status == "queued"
    with pytest.raises(Invalid) as caught:
        await submit(services, PROJECT, job.model_copy(update={"reference_ids": ids}), model=small)
    assert caught.value.message == (
        f"The reference images make each Gemini request {three:,} bytes (sent base64-encoded, with the prompt); "
        f"gemini-3-pro-image-preview takes at most {three - 1:,} bytes per request. "
        "Use fewer or smaller reference images."
    )

    # An automatic job's request carries one input at a time: only the inputs too large are named.
    largest = model.request_bytes("in watercolour", [sizes[2]])
    one_input = replace(model, max_request_bytes=largest - 1)
    automatic = AutomaticJobRequest(mode="automatic", base_prompt="in watercolour", input_ids=ids)
    with pytest.raises(Invalid) as caught:
        await submit(services, PROJECT, automatic, model=one_input)
    assert caught.value.message == (
        f"Input images too large for one Gemini request: {ids[2]} (1 in all). Each is sent base64-encoded with "
        f"the base prompt; the largest makes a request of {largest:,} bytes, and gemini-3-pro-image-preview "
        f"takes at most {largest - 1:,} bytes per request."
    )
    others = automatic.model_copy(update={"input_ids": ids[:2]})
    assert (await submit(services, PROJECT, others, model=one_input)).status == "queued"


async def test_unknown_references_are_named(services: Services) -> None:
    job = SemiAutoJobRequest(mode="semi_auto", prompts=["a fox"], images_per_prompt=1, reference_ids=["f" * 32])
    with pytest.raises(Invalid) as caught:
        await submit(services, PROJECT, job)
    assert caught.value.message.startswith(f"Unknown upload ids: {'f' * 32}.")


# --- HEIC and HEIF ---


def test_the_primary_items_size_is_read_not_the_first_or_largest() -> None:
    header = read_heif(heif_file(4032, 3024, thumbnail=(5000, 5000)))
    assert (header.format, header.width, header.height) == ("heic", 4032, 3024)
    assert read_heif(heif_file(640, 480, brands=(b"mif1", b"mif1"))).format == "heif"
    # AVIF shares the mif1 brand; Pillow reads it (and the gateway refuses it as unsupported).
    assert heif_format(heif_file(640, 480, brands=(b"avif", b"mif1", b"miaf"))) is None
    assert heif_format(heif_file(640, 480, brands=(b"mif1", b"avif"))) is None
    for damaged, reason in [
        (heif_file(64, 64)[:60], "runs past its container"),
        (box(b"ftyp", b"heic" + bytes(4) + b"mif1") + box(b"mdat", bytes(32)), "no 'meta' box"),
        (heif_file(0, 64, thumbnail=(0, 64)), "an image size of 0x64"),
    ]:
        with pytest.raises(HeifError, match=reason):
            read_heif(damaged)


async def test_a_heic_upload_is_taken_with_its_size_and_used_as_a_reference(
    flash: httpx.AsyncClient, pro: httpx.AsyncClient, services: Services
) -> None:
    (photo, still) = await uploaded(
        flash, [("photo.heic", heif_file(4032, 3024)), ("still.heif", heif_file(800, 600, brands=(b"mif1",)))]
    )
    assert (photo["format"], photo["width"], photo["height"]) == ("heic", 4032, 3024)
    assert (still["format"], still["width"], still["height"]) == ("heif", 800, 600)
    response = await flash.post("/api/jobs", json=semi_auto([photo["id"], still["id"]]))
    assert response.status_code == 202, response.text
    # Stored with its own type, which the worker gets with the reference through its link.
    async with httpx.AsyncClient() as plain:
        stored = await plain.get(services.storage.presigned_get(keys.upload_object(photo["id"])))
    assert stored.status_code == 200
    assert (stored.headers["content-type"], stored.content) == ("image/heic", heif_file(4032, 3024))
    accepted = await pro.post("/api/jobs", json=semi_auto([photo["id"]], params={"image_size": "4K"}))
    assert accepted.status_code == 202, accepted.text


async def test_a_heic_over_the_pixel_limit_or_damaged_is_refused_with_a_reason(flash: httpx.AsyncClient) -> None:
    response = await flash.post("/api/uploads", files=[("files", ("huge.heic", heif_file(8000, 6000), "image/heic"))])
    assert response.status_code == 413, response.text
    assert response.json()["detail"] == f"huge.heic: the image has 8000x6000 pixels; at most {MAX_PIXELS} are allowed"
    cut = heif_file(64, 64)[:70]
    response = await flash.post("/api/uploads", files=[("files", ("cut.heic", cut, "image/heic"))])
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("cut.heic: the file is a damaged HEIC image (")


async def test_a_dataset_stays_png_jpeg_and_webp(flash: httpx.AsyncClient) -> None:
    files = [("files", ("photo.heic", heif_file(640, 480), "image/heic"))]
    response = await flash.post("/api/datasets", files=files)
    refused(response, "photo.heic: HEIC images are not supported here; use PNG, JPEG or WEBP")


async def test_a_reference_of_a_type_the_model_does_not_take_is_refused(
    flash: httpx.AsyncClient, services: Services
) -> None:
    (photo,) = await uploaded(flash, [("photo.heic", heif_file(1200, 900))])
    no_heif = replace(spec_for(FLASH_IMAGE), reference_types=frozenset({"image/png", "image/jpeg", "image/webp"}))
    job = SemiAutoJobRequest(mode="semi_auto", prompts=["a fox"], images_per_prompt=1, reference_ids=[photo["id"]])
    with pytest.raises(Invalid) as caught:
        await submit(services, PROJECT, job, model=no_heif)
    assert caught.value.message == (
        f"Reference images of a type gemini-2.5-flash-image does not take (HEIC): {photo['id']}. "
        "It takes JPEG, PNG, WEBP."
    )
