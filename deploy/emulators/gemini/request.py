"""Reading a generateContent body the way the real API does: unknown fields, malformed values and
requests a model cannot serve are refused with a 400 before anything is generated.

Field names come from the REST reference (https://ai.google.dev/api/generate-content, GenerationConfig,
ImageConfig, Content, Part, Blob) and from what google-genai sends (google/genai/models.py,
_GenerateContentParameters_to_mldev, _GenerateContentConfig_to_mldev, _Part_to_mldev, _ImageConfig_to_mldev).
Like Google's JSON parser, both lowerCamelCase and snake_case names are accepted: google-genai 3.x mixes
them ("inlineData" with "mime_type" inside), and standard or URL-safe base64, padded or not.

A `fileData` part names a file of the Files API by its URI (types.Part.from_uri); `files` resolves it to
the uploaded bytes (files.py), which then count as an input image exactly like inlineData.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from deploy.emulators.gemini import catalog, errors
from deploy.emulators.gemini.catalog import ImageModel

REQUEST_FIELDS = (
    "model", "contents", "tools", "toolConfig", "safetySettings", "systemInstruction", "generationConfig",
    "cachedContent", "labels", "serviceTier", "store", "continuationToken",
)  # fmt: skip
GENERATION_CONFIG_FIELDS = (
    "stopSequences", "responseMimeType", "responseSchema", "responseJsonSchema", "_responseJsonSchema",
    "responseModalities", "candidateCount", "maxOutputTokens", "temperature", "topP", "topK", "seed",
    "presencePenalty", "frequencyPenalty", "responseLogprobs", "logprobs", "enableEnhancedCivicAnswers",
    "speechConfig", "thinkingConfig", "imageConfig", "mediaResolution", "audioTranscriptionConfig",
)  # fmt: skip
# The Gemini API's ImageConfig has only these two; google-genai refuses the Vertex-only ones itself.
IMAGE_CONFIG_FIELDS = ("aspectRatio", "imageSize")
CONTENT_FIELDS = ("role", "parts")
# Part's `data` oneof: exactly one of these carries the part.
PART_DATA_FIELDS = (
    "text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
    "codeExecutionResult", "toolCall", "toolResponse",
)  # fmt: skip
PART_FIELDS = (
    *PART_DATA_FIELDS, "thought", "thoughtSignature", "videoMetadata", "mediaResolution", "partMetadata",
    "audioTranscription", "documentMetadata", "mediaProcessing", "spreadsheetMetadata", "audioMetadata",
    "speechMetadata",
)  # fmt: skip
BLOB_FIELDS = ("mimeType", "data")
FILE_DATA_FIELDS = ("mimeType", "fileUri")
MODALITIES = frozenset({"TEXT", "IMAGE", "AUDIO"})
ROLES = frozenset({"user", "model"})

# A file's URI -> (its MIME type, its bytes); raises errors.ApiError when the file cannot be read.
FileResolver = Callable[[str], tuple[str, bytes]]


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    text: str
    images: list[bytes]
    # Upper-case names, or None when the request leaves the model's default (text and image) in charge.
    modalities: frozenset[str] | None
    aspect_ratio: str | None
    image_size: str | None
    include_thoughts: bool


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def pick(obj: dict[str, Any], camel: str) -> Any:
    return obj[camel] if camel in obj else obj.get(snake(camel))


def check_fields(obj: Any, allowed: Iterable[str], at: str, what: str) -> dict[str, Any]:
    """The object itself, once it is a JSON object holding only known names (camel or snake)."""
    if not isinstance(obj, dict):
        raise errors.invalid_argument(
            f"Invalid value at '{at or 'request'}' ({what}), {json.dumps(obj)[:100]}", at or None
        )
    names = {spelling for name in allowed for spelling in (name, snake(name))}
    for name in obj:
        if name not in names:
            raise errors.unknown_field(name, at or None)
    return obj


def decode_b64(data: Any, at: str) -> bytes:
    if not isinstance(data, str):
        raise errors.invalid_argument(f"Invalid value at '{at}' (TYPE_BYTES), {json.dumps(data)[:100]}", at)
    normalized = data.strip().replace("-", "+").replace("_", "/")
    normalized += "=" * (-len(normalized) % 4)
    try:
        return base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError):
        raise errors.invalid_argument(
            f"Invalid value at '{at}' (TYPE_BYTES), Base64 decoding failed for \"{data[:40]}\"", at
        ) from None


def check_image_bytes(data: bytes, mime_type: str) -> None:
    """The bytes must be a picture: the API answers an undecodable one with this 400."""
    if mime_type in ("image/heic", "image/heif"):
        decodable = data[4:8] == b"ftyp"  # Pillow has no HEIF decoder; the ISO-BMFF header is the check
    else:
        try:
            with Image.open(io.BytesIO(data)):
                decodable = True
        except (UnidentifiedImageError, OSError, ValueError):
            decodable = False
    if not decodable:
        raise errors.invalid_argument(
            f"Unable to process input image. Please retry or report in {errors.TROUBLESHOOTING}"
        )


def _part(part: Any, at: str, texts: list[str], images: list[bytes], files: FileResolver | None) -> None:
    check_fields(part, PART_FIELDS, at, "type.googleapis.com/google.ai.generativelanguage.v1beta.Part")
    present = [name for name in PART_DATA_FIELDS if pick(part, name) is not None]
    text = pick(part, "text")
    if not present or text == "":
        raise errors.invalid_argument(
            f"* GenerateContentRequest.{at}.data: required oneof field 'data' must have one initialized field\n",
            f"{at}.data",
        )
    if len(present) > 1:
        raise errors.invalid_argument(
            f"* GenerateContentRequest.{at}.data: oneof field 'data' is already set. "
            f"Cannot set '{snake(present[1])}'\n",
            f"{at}.data",
        )
    if text is not None:
        if not isinstance(text, str):
            raise errors.invalid_argument(f"Invalid value at '{at}.text' (TYPE_STRING), {json.dumps(text)}")
        if not pick(part, "thought"):
            texts.append(text)
    if (inline := pick(part, "inlineData")) is not None:
        blob_at = f"{at}.inline_data"
        check_fields(inline, BLOB_FIELDS, blob_at, "type.googleapis.com/google.ai.generativelanguage.v1beta.Blob")
        mime_type = pick(inline, "mimeType")
        if not mime_type:
            raise errors.invalid_argument(
                f"* GenerateContentRequest.{blob_at}.mime_type: mime_type must be specified\n", f"{blob_at}.mime_type"
            )
        data = decode_b64(pick(inline, "data"), f"{blob_at}.data")
        if str(mime_type).lower() not in catalog.INPUT_IMAGE_MIME_TYPES:
            raise errors.invalid_argument(f"Unsupported MIME type: {mime_type}", f"{blob_at}.mime_type")
        check_image_bytes(data, str(mime_type).lower())
        images.append(data)
    if (file_data := pick(part, "fileData")) is not None:
        file_at = f"{at}.file_data"
        check_fields(
            file_data, FILE_DATA_FIELDS, file_at, "type.googleapis.com/google.ai.generativelanguage.v1beta.FileData"
        )
        uri = pick(file_data, "fileUri")
        if not isinstance(uri, str) or not uri:
            raise errors.invalid_argument(
                f"* GenerateContentRequest.{file_at}.file_uri: file_uri must be specified\n", f"{file_at}.file_uri"
            )
        if files is None:
            raise errors.file_not_accessible(uri)
        stored_mime_type, data = files(uri)
        # The part's mimeType, when given, is what the model is told the bytes are.
        mime_type = str(pick(file_data, "mimeType") or stored_mime_type).lower()
        if mime_type not in catalog.INPUT_IMAGE_MIME_TYPES:
            raise errors.invalid_argument(f"Unsupported MIME type: {mime_type}", f"{file_at}.mime_type")
        check_image_bytes(data, mime_type)
        images.append(data)


def _contents(contents: Any, files: FileResolver | None) -> tuple[list[str], list[bytes]]:
    if contents is None or contents == []:
        raise errors.invalid_argument("* GenerateContentRequest.contents: contents is not specified\n", "contents")
    if not isinstance(contents, list):
        contents = [contents]  # proto JSON takes a lone value for a repeated field
    texts: list[str] = []
    images: list[bytes] = []
    for i, content in enumerate(contents):
        at = f"contents[{i}]"
        check_fields(content, CONTENT_FIELDS, at, "type.googleapis.com/google.ai.generativelanguage.v1beta.Content")
        role = content.get("role")
        if role not in (None, "", *ROLES):
            raise errors.invalid_argument("Please use a valid role: user, model.", f"{at}.role")
        parts = content.get("parts")
        if not parts:
            raise errors.invalid_argument(
                f"* GenerateContentRequest.{at}.parts: contents.parts must not be empty.\n", f"{at}.parts"
            )
        for j, part in enumerate(parts if isinstance(parts, list) else [parts]):
            _part(part, f"{at}.parts[{j}]", texts, images, files)
    return texts, images


def _modalities(generation: dict[str, Any]) -> frozenset[str] | None:
    value = pick(generation, "responseModalities")
    if value is None or value == []:
        return None
    at = "generation_config.response_modalities"
    found = set()
    for i, modality in enumerate(value if isinstance(value, list) else [value]):
        # The API takes enum names in any case: Google's own samples once sent ["Text", "Image"].
        if not isinstance(modality, str) or modality.upper() not in MODALITIES:
            raise errors.invalid_argument(
                f"Invalid value at '{at}[{i}]' (type.googleapis.com/google.ai.generativelanguage.v1beta."
                f"GenerationConfig.Modality), {json.dumps(modality)}",
                f"{at}[{i}]",
            )
        found.add(modality.upper())
    return frozenset(found)


def _candidate_count(generation: dict[str, Any], model: str) -> None:
    count = pick(generation, "candidateCount")
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise errors.invalid_argument(
            f"Invalid value at 'generation_config.candidate_count' (TYPE_INT32), {json.dumps(count)}",
            "generation_config.candidate_count",
        )
    if count > 1:
        # Image models answer one candidate per call: four pictures are four calls.
        raise errors.invalid_argument(f"Multiple candidates is not enabled for models/{model}")


def _image_config(image_config: dict[str, Any], model: str, spec: ImageModel | None) -> tuple[str | None, str | None]:
    aspect_ratio = pick(image_config, "aspectRatio")
    if aspect_ratio is not None and aspect_ratio not in catalog.ASPECT_RATIOS:
        raise errors.invalid_argument(
            f"Unsupported aspect ratio: {json.dumps(aspect_ratio)}. Supported values are "
            f"{', '.join(catalog.ASPECT_RATIOS)}.",
            "generation_config.image_config.aspect_ratio",
        )
    image_size = pick(image_config, "imageSize")
    if image_size is not None and spec is not None:
        if not spec.image_sizes:
            raise errors.invalid_argument(
                f"Image size is not supported for models/{model}: it draws one resolution per aspect ratio. "
                "Leave image_config.image_size unset.",
                "generation_config.image_config.image_size",
            )
        if image_size not in spec.image_sizes:
            raise errors.invalid_argument(
                f"Unsupported image size: {json.dumps(image_size)}. Supported values are "
                f"{', '.join(sorted(spec.image_sizes))} (with an uppercase K).",
                "generation_config.image_config.image_size",
            )
    return aspect_ratio, image_size


def parse_request(
    raw: bytes | dict[str, Any], model: str, spec: ImageModel | None, files: FileResolver | None = None
) -> ParsedRequest:
    """The request (the HTTP body, or one already decoded from a batch), validated for `model` (`spec`
    None: a text-only model), its file_data parts read through `files`; raises errors.ApiError."""
    if isinstance(raw, dict):
        body: Any = raw
    else:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise errors.invalid_argument(f"Invalid JSON payload received. {exc}") from None
    check_fields(body, REQUEST_FIELDS, "", "GenerateContentRequest")
    texts, images = _contents(pick(body, "contents"), files)
    generation = check_fields(
        pick(body, "generationConfig") or {}, GENERATION_CONFIG_FIELDS, "generation_config", "GenerationConfig"
    )
    modalities = _modalities(generation)
    _candidate_count(generation, model)
    image_config = check_fields(
        pick(generation, "imageConfig") or {}, IMAGE_CONFIG_FIELDS, "generation_config.image_config", "ImageConfig"
    )
    aspect_ratio, image_size = _image_config(image_config, model, spec)
    thinking = pick(generation, "thinkingConfig")
    include_thoughts = bool(isinstance(thinking, dict) and pick(thinking, "includeThoughts"))

    supported = {"TEXT", "IMAGE"} if spec is not None else {"TEXT"}
    if unsupported := sorted((modalities or frozenset()) - supported):
        raise errors.invalid_argument(
            f"Model does not support the requested response modalities: {', '.join(m.lower() for m in unsupported)}"
        )
    if spec is not None and len(images) > spec.max_references:
        raise errors.invalid_argument(
            f"Too many input images: {len(images)}. models/{model} takes at most {spec.max_references} "
            "(the emulator enforces the documented recommendation as a hard limit)."
        )
    if not images and not any(t.strip() for t in texts):
        raise errors.invalid_argument("The request has neither a text prompt nor an input image.", "contents")
    return ParsedRequest(
        model=model, text="\n".join(texts), images=images, modalities=modalities,
        aspect_ratio=aspect_ratio, image_size=image_size, include_thoughts=include_thoughts,
    )  # fmt: skip


def prompt_text(body: Any) -> str:
    """The prompt text of a request not validated yet, the way ParsedRequest.text joins it (non-thought
    text parts, one per line); "" where the shape is wrong. Batches read their whole-batch directives
    from it when they are created, before any request is parsed."""
    if not isinstance(body, dict):
        return ""
    contents = pick(body, "contents")
    texts: list[str] = []
    for content in contents if isinstance(contents, list) else [contents]:
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else [parts]:
            if isinstance(part, dict) and isinstance(text := pick(part, "text"), str) and not pick(part, "thought"):
                texts.append(text)
    return "\n".join(texts)
