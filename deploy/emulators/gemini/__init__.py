"""A local stand-in for Gemini's `models/{model}:generateContent` image generation, as strict as the real
API, with fault injection. docs/emulators.md lists each behaviour and the doc page or SDK file it follows.

    python -m deploy.emulators.gemini --host 127.0.0.1 --port 8090 [--latency-ms 0] [--image-px 256]
        [--api-key KEY ...] [--image-mode small|realistic]

Speaks the real wire format (camelCase and snake_case, standard and URL-safe base64) so the real
google-genai client can be pointed at it with HttpOptions(base_url=..., api_version="v1beta").

Keys: with --api-key only those keys work; no key is a 403, another key a 400 API_KEY_INVALID.
Models (catalog.py): gemini-2.5-flash-image (-preview) and gemini-3-pro-image-preview draw; known text
models refuse IMAGE with a 400; anything else is a 404. Requests are validated like the real API's.

Faults, per call, from directives in the prompt text (xN: only the first N calls with this exact
prompt text; without it, every call):
    [emu:429xN] [emu:quota-minutexN]   429 per-minute quota (QuotaFailure, Help, RetryInfo 0.2s)
    [emu:quota-day]                    429 per-day quota
    [emu:billing]                      400 FAILED_PRECONDITION (location / billing)
    [emu:500xN] [emu:503xN] [emu:504xN]  500 INTERNAL, 503 UNAVAILABLE, 504 DEADLINE_EXCEEDED
    [emu:sleep=MS]                     answer MS milliseconds late
    [emu:safety] [emu:recitation] [emu:max-tokens]   finishReason IMAGE_SAFETY, IMAGE_RECITATION,
                                       MAX_TOKENS, no image
    [emu:no-imagexN] [emu:image-otherxN]  finishReason NO_IMAGE / IMAGE_OTHER, no image
    [emu:blocked]                      promptFeedback.blockReason PROHIBITED_CONTENT, no candidates
    [emu:text-only]                    a text part only
    [emu:thought-only]                 only an interim image marked thought: true, finishReason STOP
or at random and by configuration, from POST /_emulator/config {"latency_ms", "latency_jitter_ms",
"error_rate", "rate_limit_rate", "timeout_rate", "daily_quota_images", "image_mode"};
GET /_emulator/stats, POST /_emulator/reset and POST /_emulator/quota/reset observe and restore it.
"""

from deploy.emulators.gemini.app import create_app
from deploy.emulators.gemini.cli import main, start

__all__ = ["create_app", "main", "start"]
