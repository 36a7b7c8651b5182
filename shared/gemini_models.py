"""What each Gemini image model accepts, so the gateway refuses a job Gemini would refuse, before
any of it is paid for or queued.

Sources (checked 2026-12-02; /work/shared/EXTERNAL_APIS.md, section "Corrections and additions",
overrides the earlier lines there):

- Image generation guide, https://ai.google.dev/gemini-api/docs/image-generation: the ten aspect
  ratios of both models; `imageSize` 1K/2K/4K for gemini-3-pro-image-preview only
  (gemini-2.5-flash-image makes one resolution per ratio: 1024x1024, 1344x768 for 16:9 ...);
  gemini-2.5-flash-image works best with up to 3 input images, gemini-3-pro-image-preview takes up
  to 14.
- Vertex AI model card, https://docs.cloud.google.com/vertex-ai/generative-ai/docs/models/gemini/3-pro-image
  ("Maximum images per prompt: 14", the same ten ratios) and the image understanding guide,
  https://ai.google.dev/gemini-api/docs/image-understanding: input MIME types image/png,
  image/jpeg, image/webp, image/heic, image/heif.
- Inline request limit: 100 MB per request since January 2026 (20 MB before); larger inputs go
  through the Files API, which Bunch does not use. Decimal megabytes, the smaller reading.
- Wire form (google-genai, site-packages/google/genai/_common.py `encode_unserializable_types`): a
  reference's bytes travel as `inline_data.data`, base64 text in the JSON body (4/3 of its size),
  and the prompt as a JSON string (escapes included).
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace

FLASH_IMAGE = "gemini-2.5-flash-image"
PRO_IMAGE = "gemini-3-pro-image-preview"

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
REFERENCE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"})
INLINE_REQUEST_BYTES = 100_000_000
# The JSON around the prompt and the images (contents, parts, mime types, generationConfig): a few
# hundred bytes in practice, counted generously so a request at the limit still fits.
ENVELOPE_BYTES = 4096
PER_REFERENCE_BYTES = 128  # one part's own keys: {"inline_data": {"mime_type": ..., "data": ...}}


@dataclass(frozen=True, slots=True)
class GeminiModel:
    name: str
    aspect_ratios: tuple[str, ...]
    image_sizes: tuple[str, ...]  # empty: the model takes no `image_size`
    max_references: int
    reference_types: frozenset[str]
    max_request_bytes: int

    def request_bytes(self, prompt: str, reference_sizes: Iterable[int]) -> int:
        """The size of one generateContent body carrying the prompt and these references inline."""
        return ENVELOPE_BYTES + prompt_bytes(prompt) + sum(reference_bytes(size) for size in reference_sizes)


def prompt_bytes(prompt: str) -> int:
    """A prompt's share of the request: a JSON string, escapes included."""
    return len(json.dumps(prompt))


def reference_bytes(size: int) -> int:
    """A reference's share of the request: its part, and its bytes in base64."""
    return PER_REFERENCE_BYTES + 4 * -(-size // 3)


MODELS: dict[str, GeminiModel] = {
    FLASH_IMAGE: GeminiModel(
        name=FLASH_IMAGE,
        aspect_ratios=ASPECT_RATIOS,
        image_sizes=(),
        max_references=3,
        reference_types=REFERENCE_TYPES,
        max_request_bytes=INLINE_REQUEST_BYTES,
    ),
    PRO_IMAGE: GeminiModel(
        name=PRO_IMAGE,
        aspect_ratios=ASPECT_RATIOS,
        image_sizes=("1K", "2K", "4K"),
        max_references=14,
        reference_types=REFERENCE_TYPES,
        max_request_bytes=INLINE_REQUEST_BYTES,
    ),
}


def spec_for(model: str) -> GeminiModel:
    """The model's limits; a model not listed here gets gemini-2.5-flash-image's, the narrower set
    (under its own name, so messages name the model the operator configured)."""
    known = MODELS.get(model)
    return known if known is not None else replace(MODELS[FLASH_IMAGE], name=model)
