"""The gateway's request and response bodies."""

from datetime import datetime
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared import models
from shared.models import ImageStatus, JobStatus


def _integral(value: Any, annotation: Any) -> Any:
    """5.0 as 5 where an integer (or a list of them) is expected; anything else unchanged."""
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if get_origin(annotation) is list and get_args(annotation) == (int,) and isinstance(value, list):
        return [int(item) if isinstance(item, float) and item.is_integer() else item for item in value]
    return value


class JsonRequest(BaseModel):
    """A request body, validated strictly: JSON types exactly as the OpenAPI description says (no
    `true` for 1, no "5" for 5), so what the description allows is what the API accepts. A number
    without a fraction (5.0) is an integer, as in JSON Schema."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fixed = dict(data)
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key in fixed:
                fixed[key] = _integral(fixed[key], field.annotation)
        return fixed


class SemiAutoJobRequest(JsonRequest, models.SemiAutoJobRequest):
    pass


class AutomaticJobRequest(JsonRequest, models.AutomaticJobRequest):
    pass


JobRequest = Annotated[SemiAutoJobRequest | AutomaticJobRequest, Field(discriminator="mode")]


class UploadInfo(BaseModel):
    id: str
    sha256: str
    width: int
    height: int
    format: str
    bytes: int


class UploadsCreated(BaseModel):
    uploads: list[UploadInfo]


class JobLinks(BaseModel):
    status: str
    results: str
    download: str
    events: str


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    links: JobLinks


class Progress(BaseModel):
    images_total: int
    images_succeeded: int
    images_failed: int
    runs_total: int
    runs_done: int


class ZipInfo(BaseModel):
    ready: bool
    bytes: int | None = None
    url: str | None = None


class JobStatusView(BaseModel):
    id: str
    status: JobStatus
    mode: str
    group: str
    group_id: str | None = None
    priority: int
    progress: Progress
    queue_position: int | None
    eta_seconds: float | None
    eta_wait_seconds: float | None = None
    eta_run_seconds: float | None = None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    zip: ZipInfo
    retry_of: str | None = None
    retried_by: str | None = None


class JobList(BaseModel):
    jobs: list[JobStatusView]
    next_cursor: str | None


class PriorityChange(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(ge=0, le=1000)


class RedoRequest(JsonRequest):
    model_config = ConfigDict(extra="forbid")

    indices: list[int] = Field(min_length=1, max_length=10_000)


class Canceled(BaseModel):
    id: str
    status: JobStatus
    runs_stopped: int


class JobView(JobStatusView):
    config: dict[str, Any]


class ImageView(BaseModel):
    index: int
    status: ImageStatus
    url: str | None
    # The prompt is the page's `prompts[prompt_index]`: one job's prompts are few and long, its
    # images many, so they are sent once per page rather than once per image.
    prompt_index: int
    # Automatic mode: the input image this one is a variation of (its reference image).
    input_id: str | None
    created_at: datetime | None
    error: str | None
    detail: str | None = None


class JobResults(BaseModel):
    """One page of a job's images, in index order; `next_cursor` asks for the next page."""

    id: str
    status: JobStatus
    images_total: int
    # The prompts the page's images name, by prompt index (the base prompt is prompt 0).
    prompts: dict[int, str]
    # Semi-automatic mode: the reference images every image of the job was made from.
    reference_ids: list[str]
    images: list[ImageView]
    next_cursor: str | None
    zip: ZipInfo


class Problem(BaseModel):
    """Every error answer: `detail` says what went wrong and what to change."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ValidationProblem(Problem):
    """422: `detail` sums up every problem; `errors` lists them per field when they are per field."""

    errors: list[FieldError] = Field(default_factory=list)


_PROBLEMS: dict[int, str] = {
    400: "The request body could not be read (not valid JSON or form data)",
    401: "Missing or unknown API key",
    403: "Forbidden",
    404: "Not found in the caller's project",
    409: "Conflicts with the current state",
    413: "Too large (request body, file, archive or job)",
    415: "Not a supported image",
    422: "Invalid request",
    503: "Redis or object storage is unavailable; nothing was changed",
}


def problems(*codes: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error answers, each with its JSON body (`Problem`, or `ValidationProblem`
    for 422), described by `described` or by the default text of the code."""
    texts = {**_PROBLEMS, **(described or {})}
    return {
        code: {"model": ValidationProblem if code == 422 else Problem, "description": texts[code]} for code in codes
    }


# What every /api route may answer besides its own success and errors.
API_PROBLEMS = problems(400, 401, 413, 422, 503)
