"""A local stand-in for Gemini's `models/{model}:generateContent` image generation, its Batch API and its
Files API, as strict as the real API, with fault injection. docs/emulators.md lists each behaviour and the
doc page or SDK file it follows.

    python -m deploy.emulators.gemini --host 127.0.0.1 --port 8090 [--latency-ms 0] [--image-px 256]
        [--api-key KEY ...] [--image-mode small|realistic] [--batch-pending-seconds 1]
        [--batch-running-seconds 2] [--batch-expire-seconds 172800] [--file-ttl-seconds 172800]

Speaks the real wire format (camelCase and snake_case, standard and URL-safe base64) so the real
google-genai client can be pointed at it with HttpOptions(base_url=...), under v1 (google-genai 3.x's
default) or api_version="v1beta".

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
"error_rate", "rate_limit_rate", "timeout_rate", "daily_quota_images", "image_mode", "revoked_keys",
"batch_pending_seconds", "batch_running_seconds", "batch_expire_seconds", "file_ttl_seconds"};
GET /_emulator/stats, POST /_emulator/reset and POST /_emulator/quota/reset observe and restore it.

Batches (batches.py: POST …/models/{model}:batchGenerateContent, GET/DELETE …/batches/{id},
POST …/batches/{id}:cancel, GET …/batches) run each request like a generateContent call, so the
directives above apply per request; these apply to the whole batch holding such a request (xN: only the
first N batches holding that prompt text):
    [emu:batch-expire] [emu:batch-expirexN]   the batch ends BATCH_STATE_EXPIRED, with no results
    [emu:batch-fail] [emu:batch-failxN]       the batch ends BATCH_STATE_FAILED with an `error`
Files (files.py: resumable upload at /upload/{version}/files, get, list, delete, download) back batch
input and output files and `fileData` parts, which generateContent reads too.
"""

from deploy.emulators.gemini.app import create_app
from deploy.emulators.gemini.cli import main, start

__all__ = ["create_app", "main", "start"]
