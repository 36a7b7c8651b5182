"""What the emulator knows about Gemini's models: which exist, which draw images, and each image
model's limits, resolutions and token counts.

Sources (the doc pages are https://ai.google.dev/gemini-api/docs/...):
- image-generation: the 10 aspect ratios; gemini-2.5-flash-image's one resolution per ratio and 1,290
  tokens per image; gemini-3-pro-image-preview's 1K/2K/4K tables (1,120 tokens for 1K and 2K, 2,000 for
  4K), "up to 14 reference images", and "works best with up to 3 images" for 2.5 Flash Image;
  "use an uppercase K" for imageSize.
- models: the model codes; image-understanding: the input MIME types (PNG, JPEG, WEBP, HEIC, HEIF)
  and 258 tokens for an image of at most 384 px a side (the emulator charges it for every image).
- The 100 MB inline request limit is the January 2026 raise (from 20 MB) noted in
  /work/shared/EXTERNAL_APIS.md, "Corrections and additions".
- batch-api: inline batches "keep the total request size under 20MB"; files: "a per-file maximum size of
  2 GB", files "stored for 48 hours".
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

ASPECT_RATIOS: Final = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
DEFAULT_ASPECT_RATIO: Final = "1:1"
DEFAULT_IMAGE_SIZE: Final = "1K"
INPUT_IMAGE_MIME_TYPES: Final = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
MAX_REQUEST_BYTES: Final = 100 * 1024 * 1024
# A batchGenerateContent body with its requests inline (the batch-api page's 20 MB).
MAX_BATCH_REQUEST_BYTES: Final = 20 * 1024 * 1024
MAX_FILE_BYTES: Final = 2 * 1024 * 1024 * 1024
# A batch's input file: the batch-api page uploads it with mime_type "jsonl"; the registered and common
# JSON Lines types are taken too. Anything else (application/json, text/plain) is refused.
JSONL_MIME_TYPES: Final = frozenset({
    "jsonl", "application/jsonl", "application/x-jsonl", "application/jsonlines", "application/x-jsonlines",
    "application/json-lines", "application/ndjson", "application/x-ndjson", "text/jsonl",
})  # fmt: skip
TOKENS_PER_INPUT_IMAGE: Final = 258
API_VERSIONS: Final = frozenset({"v1", "v1beta"})

Resolutions = MappingProxyType[str, tuple[int, int]]


@dataclass(frozen=True)
class ImageModel:
    name: str
    # The emulator refuses more references than this, although the docs only say a model "works best"
    # with up to 3 (2.5 Flash Image): a client that stays within it never meets a surprise later.
    max_references: int
    # Accepted values of imageConfig.imageSize; empty means the field is refused.
    image_sizes: frozenset[str]
    # imageSize ("1K" when unset) -> aspect ratio -> (width, height) of the real model's output.
    resolutions: MappingProxyType[str, Resolutions]
    output_tokens: MappingProxyType[str, int]
    # Gemini 3 "thinks" in images: an interim image marked thought: true comes before the final one.
    thought_images: bool

    def resolution(self, aspect_ratio: str | None, image_size: str | None) -> tuple[int, int]:
        return self.resolutions[image_size or DEFAULT_IMAGE_SIZE][aspect_ratio or DEFAULT_ASPECT_RATIO]

    def image_tokens(self, image_size: str | None) -> int:
        return self.output_tokens[image_size or DEFAULT_IMAGE_SIZE]


def _table(rows: dict[str, tuple[int, int]]) -> Resolutions:
    assert tuple(rows) == ASPECT_RATIOS
    return MappingProxyType(rows)


FLASH_IMAGE_RESOLUTIONS = _table({
    "1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
    "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672),
})  # fmt: skip
PRO_IMAGE_RESOLUTIONS = MappingProxyType({
    "1K": _table({
        "1:1": (1024, 1024), "2:3": (848, 1264), "3:2": (1264, 848), "3:4": (896, 1200), "4:3": (1200, 896),
        "4:5": (928, 1152), "5:4": (1152, 928), "9:16": (768, 1376), "16:9": (1376, 768), "21:9": (1584, 672),
    }),
    "2K": _table({
        "1:1": (2048, 2048), "2:3": (1696, 2528), "3:2": (2528, 1696), "3:4": (1792, 2400),
        "4:3": (2400, 1792), "4:5": (1856, 2304), "5:4": (2304, 1856), "9:16": (1536, 2752),
        "16:9": (2752, 1536), "21:9": (3168, 1344),
    }),
    "4K": _table({
        "1:1": (4096, 4096), "2:3": (3392, 5056), "3:2": (5056, 3392), "3:4": (3584, 4800),
        "4:3": (4800, 3584), "4:5": (3712, 4608), "5:4": (4608, 3712), "9:16": (3072, 5504),
        "16:9": (5504, 3072), "21:9": (6336, 2688),
    }),
})  # fmt: skip

FLASH_IMAGE = ImageModel(
    name="gemini-2.5-flash-image",
    max_references=3,
    image_sizes=frozenset(),
    resolutions=MappingProxyType({DEFAULT_IMAGE_SIZE: FLASH_IMAGE_RESOLUTIONS}),
    output_tokens=MappingProxyType({DEFAULT_IMAGE_SIZE: 1290}),
    thought_images=False,
)
PRO_IMAGE = ImageModel(
    name="gemini-3-pro-image-preview",
    max_references=14,
    image_sizes=frozenset({"1K", "2K", "4K"}),
    resolutions=PRO_IMAGE_RESOLUTIONS,
    output_tokens=MappingProxyType({"1K": 1120, "2K": 1120, "4K": 2000}),
    thought_images=True,
)
IMAGE_MODELS: Final = MappingProxyType({
    FLASH_IMAGE.name: FLASH_IMAGE,
    "gemini-2.5-flash-image-preview": FLASH_IMAGE,  # the preview code, still answered
    PRO_IMAGE.name: PRO_IMAGE,
})  # fmt: skip
# Models that exist but answer in text only: asking them for IMAGE is a 400, not a 404.
TEXT_MODELS: Final = frozenset({
    "gemini-2.0-flash", "gemini-2.0-flash-001", "gemini-2.0-flash-lite", "gemini-2.5-flash",
    "gemini-2.5-flash-lite", "gemini-2.5-pro", "gemini-3-pro-preview", "gemini-flash-latest",
    "gemini-flash-lite-latest", "gemini-pro-latest",
})  # fmt: skip

# Thinking tokens of gemini-3-pro-image-preview: illustrative, the docs give no figure.
THOUGHT_TOKENS: Final = 240
