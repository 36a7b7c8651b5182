"""Checking an uploaded file is a real, supported, reasonably sized image: PNG, JPEG and WEBP with
Pillow, HEIC and HEIF (which Pillow cannot read without a plugin) from their container's header."""

import hashlib
import io
import struct
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.errors import Invalid, TooLarge, Unsupported

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
HEIF_FORMATS = {"heic": "image/heic", "heif": "image/heif"}


class ImageRejected(Invalid):
    """Not an image Bunch takes; `reason` says why, for the file it is about."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooLargeImage(ImageRejected, TooLarge):
    pass


class UnsupportedImage(ImageRejected, Unsupported):
    pass


@dataclass(frozen=True)
class CheckedImage:
    sha256: str
    width: int
    height: int
    format: str
    content_type: str
    size: int

    @property
    def upload_id(self) -> str:
        return self.sha256[:32]


# --- HEIC and HEIF: ISO/IEC 23008-12 images in an ISO base media file (ISO/IEC 14496-12) ---
#
# Pillow cannot decode them without a plugin, and Bunch never decodes a reference itself (Gemini
# does), so they are judged from the container: the `ftyp` brand says what the file is, and the
# primary image's `ispe` property (meta -> iprp -> ipco, linked to the item by iprp/ipma) its size.

# Brands of HEVC-coded images and sequences, and the codec-neutral ones (ISO/IEC 23008-12 annex B).
HEVC_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
NEUTRAL_BRANDS = frozenset({b"mif1", b"msf1"})
MAX_FTYP_BYTES = 1024
MAX_BOXES = 4096  # per container: a hostile file of tiny boxes costs a bounded loop, not one per 8 bytes


class HeifError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class HeifHeader:
    format: str  # "heic" or "heif" (HEIF_FORMATS)
    width: int
    height: int


def heif_format(data: bytes) -> str | None:
    """The format (heic or heif) of a file that opens with an `ftyp` box of a HEIF brand, else None
    (an AVIF, whose brands include mif1 too, is not one: Pillow reads those)."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = struct.unpack_from(">I", data)[0]
    if not 16 <= size <= min(len(data), MAX_FTYP_BYTES):
        return None
    major = data[8:12]
    brands = {major} | {data[at : at + 4] for at in range(16, size - 3, 4)}
    if major in HEVC_BRANDS or (major in NEUTRAL_BRANDS and brands & HEVC_BRANDS):
        return "heic"
    if major in NEUTRAL_BRANDS and not brands & {b"avif", b"avis"}:
        return "heif"
    return None


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The boxes between start and end: (type, payload start, box end)."""
    position, count = start, 0
    while position < end:
        count += 1
        if count > MAX_BOXES:
            raise HeifError("too many boxes")
        if end - position < 8:
            raise HeifError("a truncated box header")
        size, kind = struct.unpack_from(">I4s", data, position)
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if end - position < 16:
                raise HeifError("a truncated box header")
            size, header = struct.unpack_from(">Q", data, position + 8)[0], 16
        elif size == 0:  # the box runs to the end of its container
            size = end - position
        if size < header or size > end - position:
            raise HeifError(f"the {kind.decode('latin-1')!r} box runs past its container")
        yield kind, position + header, position + size
        position += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int]:
    for found, payload, box_end in _boxes(data, start, end):
        if found == kind:
            return payload, box_end
    raise HeifError(f"no {kind.decode()!r} box")


def _read(data: bytes, fmt: str, at: int, end: int) -> tuple[int, ...]:
    if at + struct.calcsize(fmt) > end:
        raise HeifError("a truncated box")
    return struct.unpack_from(fmt, data, at)


def _primary_properties(data: bytes, meta: int, meta_end: int, iprp: int, iprp_end: int) -> list[int]:
    """The 1-based ipco indices of the primary item's properties (empty if the file does not say)."""
    try:
        pitm, pitm_end = _child(data, meta, meta_end, b"pitm")
        ipma, ipma_end = _child(data, iprp, iprp_end, b"ipma")
    except HeifError:
        return []
    version = data[pitm] if pitm < pitm_end else 0
    (primary,) = _read(data, ">I" if version else ">H", pitm + 4, pitm_end)
    (word,) = _read(data, ">I", ipma, ipma_end)  # version (8 bits), flags (24)
    wide_ids, wide_indices = word >> 24 >= 1, bool(word & 1)
    (entries,) = _read(data, ">I", ipma + 4, ipma_end)
    at = ipma + 8
    for _ in range(min(entries, MAX_BOXES)):
        (item,) = _read(data, ">I" if wide_ids else ">H", at, ipma_end)
        at += 4 if wide_ids else 2
        (count,) = _read(data, ">B", at, ipma_end)
        at += 1
        width = 2 if wide_indices else 1
        raw = _read(data, f">{count}{'H' if wide_indices else 'B'}", at, ipma_end)
        at += count * width
        if item == primary:  # the top bit of each association marks it essential
            return [value & (0x7FFF if wide_indices else 0x7F) for value in raw]
    return []


def read_heif(data: bytes) -> HeifHeader:
    """The HEIF file's format and primary image size; HeifError if its boxes cannot be read."""
    kind = heif_format(data)
    if kind is None:
        raise HeifError("not a HEIF file")
    meta, meta_end = _child(data, 0, len(data), b"meta")
    meta += 4  # a full box: version and flags come before its children
    iprp, iprp_end = _child(data, meta, meta_end, b"iprp")
    ipco, ipco_end = _child(data, iprp, iprp_end, b"ipco")
    sizes: dict[int, tuple[int, int]] = {}
    for index, (found, payload, box_end) in enumerate(_boxes(data, ipco, ipco_end), start=1):
        if found == b"ispe":  # a full box: version and flags, then width and height
            width, height = _read(data, ">4xII", payload, box_end)
            sizes[index] = (width, height)
    if not sizes:
        raise HeifError("no image size (ispe) property")
    primary = [sizes[index] for index in _primary_properties(data, meta, meta_end, iprp, iprp_end) if index in sizes]
    # Without a primary item's own size, the largest one: the pixel limit must not be dodged.
    width, height = primary[0] if primary else max(sizes.values(), key=lambda size: size[0] * size[1])
    if width < 1 or height < 1:
        raise HeifError(f"an image size of {width}x{height}")
    return HeifHeader(kind, width, height)


def declared_pixels(data: bytes) -> int | None:
    """Width x height from the image's header alone (no decode), or None if it cannot be read."""
    if heif_format(data) is not None:
        try:
            header = read_heif(data)
        except HeifError:
            return None
        return header.width * header.height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # anything Pillow raises on a hostile header: check_image says why
        return None
    return int(width * height)


def _check_heif(
    data: bytes,
    kind: str,
    max_pixels: int,
    heif_types: Collection[str],
    sha256: str | None,
    before_decode: Callable[[int, int], None] | None,
) -> CheckedImage:
    name = kind.upper()
    if HEIF_FORMATS[kind] not in heif_types:
        raise UnsupportedImage(f"{name} images are not supported here; use PNG, JPEG or WEBP")
    try:
        header = read_heif(data)
    except HeifError as exc:
        raise ImageRejected(f"the file is a damaged {name} image ({exc})") from None
    width, height = header.width, header.height
    if width * height > max_pixels:
        raise TooLargeImage(f"the image has {width}x{height} pixels; at most {max_pixels} are allowed")
    if before_decode is not None:
        before_decode(width, height)
    return CheckedImage(
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=kind,
        content_type=HEIF_FORMATS[kind],
        size=len(data),
    )


def check_image(
    data: bytes,
    max_bytes: int,
    max_pixels: int,
    *,
    sha256: str | None = None,
    before_decode: Callable[[int, int], None] | None = None,
    heif_types: Collection[str] = (),
) -> CheckedImage:
    """Blocking (decodes the whole image): run it in a thread.

    `sha256` is the data's digest when the caller has it already (datasets hash every entry to drop
    copies before decoding them). `before_decode(width, height)` runs once the header has been read
    and judged, before the pixels are decoded: a budget it raises on is never spent. `heif_types`:
    which of image/heic and image/heif to take (their size is read from the container, their
    pixels are left to Gemini); without them, such a file is refused as unsupported."""
    if not data:
        raise ImageRejected("the file is empty")
    if len(data) > max_bytes:
        raise TooLargeImage(f"the file is larger than {max_bytes // (1024 * 1024)} MB")
    heif = heif_format(data)
    if heif is not None:
        return _check_heif(data, heif, max_pixels, heif_types, sha256, before_decode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise TooLargeImage(f"the image has {width}x{height} pixels; at most {max_pixels} are allowed")
            # Many cameras and phones write MPO: a JPEG followed by extra images (a preview, a depth
            # map) that JPEG readers ignore. It is a JPEG to everyone downstream, not an animation.
            jpeg_with_extras = image.format == "MPO"
            if image.format not in ALLOWED_FORMATS and not jpeg_with_extras:
                raise UnsupportedImage(f"{image.format} images are not supported; use PNG, JPEG or WEBP")
            if getattr(image, "n_frames", 1) > 1 and not jpeg_with_extras:
                raise UnsupportedImage("animated images are not supported")
            if before_decode is not None:
                before_decode(width, height)
            image.load()  # decodes every pixel (of the first frame): catches truncated and corrupt files
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooLargeImage("the image has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else f"a damaged image ({exc})"
        kind = UnsupportedImage if isinstance(exc, UnidentifiedImageError) else ImageRejected
        raise kind(f"the file is {reason}") from None
    fmt = "JPEG" if jpeg_with_extras else str(image.format)
    return CheckedImage(
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        format=fmt.lower(),
        content_type=ALLOWED_FORMATS[fmt],
        size=len(data),
    )
