"""Google's error bodies, exactly as generativelanguage.googleapis.com sends them.

Shape (https://ai.google.dev/api/rest, "Errors"; google.rpc.Status): {"error": {"code", "message",
"status", "details"?}}, `details` left out when empty (proto3 JSON). The real google-genai client reads
this body into errors.ClientError (4xx) or errors.ServerError (5xx) with .code .status .message and the
whole body in .details (google/genai/errors.py, APIError.__init__ and raise_error).

Messages are the real ones where they are known (troubleshooting page, rate-limits page and reported
responses); where Google documents none, the message says plainly what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from aiohttp import web

SERVICE: Final = "generativelanguage.googleapis.com"
TROUBLESHOOTING: Final = "https://developers.generativeai.google/guide/troubleshooting"
RATE_LIMITS_DOC: Final = "https://ai.google.dev/gemini-api/docs/rate-limits"
QUOTA_METRIC: Final = f"{SERVICE}/generate_content_requests"
PER_MINUTE_QUOTA_ID: Final = "GenerateRequestsPerMinutePerProjectPerModel"
PER_DAY_QUOTA_ID: Final = "GenerateRequestsPerDayPerProjectPerModel"
# Quota values the emulator reports when no configured limit applies: illustrative Tier 1 figures.
PER_MINUTE_QUOTA_VALUE: Final = 500
PER_DAY_QUOTA_VALUE: Final = 2000
# Short on purpose (tests wait for it); real per-day 429s also carry a delay of seconds, which is
# why a client must read the quotaId rather than trust RetryInfo.
RETRY_DELAY: Final = "0.2s"

QuotaWindow = Literal["minute", "day"]

# google.rpc.Code: a google.rpc.Status inside a resource (a batch's `error`, a batch request's `error`, an
# output line's `error`) carries the canonical gRPC code, not the HTTP status of the JSON error envelope
# (https://cloud.google.com/apis/design/errors, "Error model" and "HTTP mapping").
GRPC_CODES: Final = {
    "CANCELLED": 1, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5, "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "INTERNAL": 13,
    "UNAVAILABLE": 14, "UNAUTHENTICATED": 16,
}  # fmt: skip


@dataclass
class ApiError(Exception):
    code: int
    status: str
    message: str
    # The emulator's own name for this error, counted in GET /_emulator/stats "by_error".
    kind: str
    details: list[dict[str, Any]] = field(default_factory=list)
    # Extra response headers (the upload protocol's X-Goog-Upload-Status).
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def status_proto(self) -> dict[str, Any]:
        """The same error as a google.rpc.Status inside a resource: gRPC code and message. No `details`:
        google-genai reads it into types.JobError, whose `details` is a list of strings."""
        return {"code": GRPC_CODES[self.status], "message": self.message}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.code, headers=self.headers or None)


# --- keys ------------------------------------------------------------------------------------------------


def no_key() -> ApiError:
    return ApiError(
        403, "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity). "
        "Please use API Key or other form of API consumer identity to call this API.",
        "permission_denied",
    )  # fmt: skip


def api_key_invalid() -> ApiError:
    message = "API key not valid. Please pass a valid API key."
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": SERVICE},
        },
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
    ]
    return ApiError(400, "INVALID_ARGUMENT", message, "api_key_invalid", details)


def bad_oauth_token() -> ApiError:
    return ApiError(
        401, "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or "
        "other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "unauthenticated",
    )  # fmt: skip


def file_not_accessible(file_id: str) -> ApiError:
    """A file that does not exist, was deleted or has expired: the Files API answers all three alike
    (files.get, and a file_data part naming it)."""
    return ApiError(
        403, "PERMISSION_DENIED", f"You do not have permission to access the File {file_id} or it may not exist.",
        "permission_denied",
    )  # fmt: skip


def billing() -> ApiError:
    return ApiError(
        400, "FAILED_PRECONDITION",
        "User location is not supported for the API use without a billing account linked.",
        "billing",
    )  # fmt: skip


# --- the request -----------------------------------------------------------------------------------------


def method_not_found(version: str, method: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"Method {method or '(none)'} not found for {version}.", "not_found")


def model_not_found(model: str, version: str, method: str = "generateContent") -> ApiError:
    return ApiError(
        404, "NOT_FOUND",
        f"models/{model} is not found for API version {version}, or is not supported for {method}. "
        "Call ListModels to see the list of available models and their supported methods.",
        "not_found",
    )  # fmt: skip


def not_found(what: str) -> ApiError:
    """A batch (or other resource) that does not exist or was deleted: Google's standard NOT_FOUND."""
    return ApiError(404, "NOT_FOUND", f"Requested entity was not found: {what}.", "not_found")


def failed_precondition(message: str) -> ApiError:
    return ApiError(400, "FAILED_PRECONDITION", message, "failed_precondition")


def already_exists(message: str) -> ApiError:
    return ApiError(409, "ALREADY_EXISTS", message, "already_exists")


def invalid_argument(message: str, field_path: str | None = None) -> ApiError:
    """A 400; with `field_path`, the google.rpc.BadRequest detail Google adds for a malformed field."""
    details: list[dict[str, Any]] = []
    if field_path is not None:
        details = [{
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": field_path, "description": message}],
        }]  # fmt: skip
    return ApiError(400, "INVALID_ARGUMENT", message, "invalid_argument", details)


def unknown_field(name: str, at: str | None) -> ApiError:
    where = f" at '{at}'" if at else ""
    return invalid_argument(f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.', at)


def request_too_large(limit: int) -> ApiError:
    error = invalid_argument(f"Request payload size exceeds the limit: {limit} bytes.")
    error.kind = "request_too_large"
    return error


# --- quota and server faults -----------------------------------------------------------------------------


def quota_exceeded(model: str | None, window: QuotaWindow, limit: int | None = None) -> ApiError:
    """429 as in the rate-limits page: QuotaFailure (which quota), Help (a link), RetryInfo (a delay).
    `model` None: a call that names no model (batches.get, files.list, ...)."""
    quota_id = PER_MINUTE_QUOTA_ID if window == "minute" else PER_DAY_QUOTA_ID
    value = limit if limit is not None else (PER_MINUTE_QUOTA_VALUE if window == "minute" else PER_DAY_QUOTA_VALUE)
    message = (
        "You exceeded your current quota, please check your plan and billing details. For more information "
        f"on this error, head to: {RATE_LIMITS_DOC}. To monitor your current usage, head to: "
        f"https://ai.dev/usage?tab=rate-limit. \n* Quota exceeded for metric: {QUOTA_METRIC}, limit: {value}"
        f"{f', model: {model}' if model else ''}\nPlease retry in {RETRY_DELAY}."
    )
    dimensions = {"location": "global", "model": model} if model else {"location": "global"}
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{
                "quotaMetric": QUOTA_METRIC,
                "quotaId": quota_id,
                "quotaDimensions": dimensions,
                "quotaValue": str(value),
            }],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [{"description": "Learn more about Gemini API quotas", "url": RATE_LIMITS_DOC}],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": RETRY_DELAY},
    ]  # fmt: skip
    return ApiError(429, "RESOURCE_EXHAUSTED", message, f"quota_{window}", details)


def internal() -> ApiError:
    return ApiError(
        500, "INTERNAL", f"An internal error has occurred. Please retry or report in {TROUBLESHOOTING}", "internal"
    )


def unavailable() -> ApiError:
    return ApiError(503, "UNAVAILABLE", "The model is overloaded. Please try again later.", "unavailable")


def deadline_exceeded() -> ApiError:
    return ApiError(504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete.", "deadline_exceeded")


SERVER_FAULTS: Final = {500: internal, 503: unavailable, 504: deadline_exceeded}
