"""Checking an uploaded file is a real, supported, reasonably sized image (with Pillow)."""

import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.errors import Invalid, TooLarge, Unsupported

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


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


def declared_pixels(data: bytes) -> int | None:
    """Width x height from the image's header alone (no decode), or None if it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # anything Pillow raises on a hostile header: check_image says why
        return None
    return int(width * height)


def check_image(
    data: bytes,
    max_bytes: int,
    max_pixels: int,
    *,
    sha256: str | None = None,
    before_decode: Callable[[int, int], None] | None = None,
) -> CheckedImage:
    """Blocking (decodes the whole image): run it in a thread.

    `sha256` is the data's digest when the caller has it already (datasets hash every entry to drop
    copies before decoding them). `before_decode(width, height)` runs once the header has been read
    and judged, before the pixels are decoded: a budget it raises on is never spent."""
    if not data:
        raise ImageRejected("the file is empty")
    if len(data) > max_bytes:
        raise TooLargeImage(f"the file is larger than {max_bytes // (1024 * 1024)} MB")
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
