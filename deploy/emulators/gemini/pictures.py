"""The pictures the emulator answers with.

"small" (the default): a few-KB PNG per call, longest side `--image-px`, drawn from the prompt and the
reference thumbnails and different on every call. "realistic": the real model's resolution for the
model, aspect ratio and image size (catalog.py) at real-looking byte sizes (about 1.7 MB at 1344x768):
noise plus a drawing, rendered once per size in a thread and cached; each call gets those pixels with
its own PNG tEXt chunk, so the bytes still differ per call.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import struct
import textwrap
import zlib

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

# Gaussian noise (sigma=20 around grey) blended at 10 % over gradients: PNG then compresses to about
# 1.6 bytes per pixel, which is what real generated PNGs weigh.
NOISE_SIGMA = 20
NOISE_WEIGHT = 0.1
REALISTIC_CACHE_SIZES = 16


def small_size(px: int, aspect_ratio: str | None) -> tuple[int, int]:
    """The longer side is `px`; the other follows the requested ratio."""
    match = re.fullmatch(r"(\d+):(\d+)", aspect_ratio or "")
    w, h = (int(match.group(1)), int(match.group(2))) if match else (1, 1)
    if w <= 0 or h <= 0:
        w = h = 1
    if w >= h:
        return px, max(1, round(px * h / w))
    return max(1, round(px * w / h)), px


def render_small(text: str, references: list[bytes], serial: int, size: tuple[int, int]) -> bytes:
    """A real PNG, different on every call: colour from (prompt, references, serial), text and thumbnails."""
    digest = hashlib.sha256(text.encode() + b"".join(references) + serial.to_bytes(8, "big")).digest()
    background = (digest[0], digest[1], digest[2])
    ink = (0, 0, 0) if sum(background) > 384 else (255, 255, 255)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, size[0] // 24))
    chars_per_line = max(8, size[0] // max(6, size[0] // 40))
    lines = textwrap.wrap(text, chars_per_line)[:8] or ["(no prompt)"]
    draw.multiline_text((6, 6), "\n".join(lines), fill=ink, font=font)
    thumb_side = max(8, min(size) // 4)
    x = 6
    for data in references:
        try:
            with Image.open(io.BytesIO(data)) as ref:
                thumb = ref.convert("RGB")
                thumb.thumbnail((thumb_side, thumb_side))
        except (UnidentifiedImageError, OSError, ValueError):
            thumb = Image.new("RGB", (thumb_side, thumb_side), (128, 128, 128))
        if x + thumb.width > size[0]:
            break
        image.paste(thumb, (x, size[1] - thumb.height - 6))
        x += thumb.width + 4
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def render_realistic(size: tuple[int, int]) -> bytes:
    w, h = size
    noise = Image.merge("RGB", [Image.effect_noise(size, NOISE_SIGMA) for _ in range(3)])
    ramp = Image.linear_gradient("L")
    base = Image.merge("RGB", [ramp.resize(size), ramp.rotate(90).resize(size), Image.new("L", size, 128)])
    image = Image.blend(base, noise, NOISE_WEIGHT)
    draw = ImageDraw.Draw(image)
    for i in range(12):
        box = (i * w // 14, i * h // 16, i * w // 14 + w // 5, i * h // 16 + h // 4)
        draw.ellipse(box, outline=(255 - 20 * i, 20 * i, 120), width=max(2, w // 200))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def with_text_chunk(png: bytes, keyword: str, text: str) -> bytes:
    """`png` with a tEXt chunk inserted before IEND (the last 12 bytes): same pixels, other bytes."""
    data = keyword.encode("latin-1") + b"\0" + text.encode("latin-1", "replace")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:-12] + chunk + png[-12:]


class RealisticImages:
    """Cached base pictures by size; concurrent first calls for a size share one rendering."""

    def __init__(self) -> None:
        self._bases: dict[tuple[int, int], asyncio.Task[bytes]] = {}

    async def get(self, size: tuple[int, int], tag: str) -> bytes:
        task = self._bases.get(size)
        if task is None:
            if len(self._bases) >= REALISTIC_CACHE_SIZES:
                self._bases.pop(next(iter(self._bases)))
            task = self._bases[size] = asyncio.create_task(asyncio.to_thread(render_realistic, size))
        try:
            # Shielded: a caller that goes away must not cancel the rendering others wait for.
            base = await asyncio.shield(task)
        except Exception:
            self._bases.pop(size, None)
            raise
        return await asyncio.to_thread(with_text_chunk, base, "emulator", tag)
