"""What every route's bodies share: strict JSON requests, and the error answers in the OpenAPI description."""

from datetime import datetime
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class Problem(BaseModel):
    """Every error answer: `detail` says what went wrong and what to change."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class ValidationProblem(Problem):
    """422: `detail` sums up every problem; `errors` lists them per field when they are per field."""

    errors: list[FieldError] = Field(default_factory=list)


class BudgetFigures(BaseModel):
    """What a 402 carries beside its message: the quote and the budget's standing, in USD."""

    quote_usd: float
    spent_usd: float
    limit_usd: float
    remaining_usd: float
    period: Literal["day", "month"]
    resets_at: datetime


class OverBudgetProblem(Problem, BudgetFigures):
    """402: the job would cost more than the project's budget has left this period; nothing was
    stored. Amounts in USD."""


_PROBLEMS: dict[int, str] = {
    400: "The request could not be read (a JSON body nested too deep, a malformed header)",
    401: "Missing or unknown API key",
    402: "Over the project's budget for this period (its figures in the body); nothing was stored",
    403: "Forbidden",
    404: "Not found in the caller's project",
    409: "Conflicts with the current state",
    413: "Too large (request body, file, archive or job)",
    415: "Not a supported image",
    429: "Over a quota or limit of the project; see Retry-After",
    422: "Invalid request",
    503: "Redis or object storage is unavailable; nothing was changed",
}


def problems(*codes: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error answers, each with its JSON body (`Problem`, or `ValidationProblem`
    for 422), described by `described` or by the default text of the code."""
    texts = {**_PROBLEMS, **(described or {})}
    models: dict[int, type[Problem]] = {422: ValidationProblem, 402: OverBudgetProblem}
    return {code: {"model": models.get(code, Problem), "description": texts[code]} for code in codes}


class DocumentProblem(BaseModel):
    """Every error answer of the document style (services/gateway/document_style.py): `error` says
    what went wrong, with the status code the rest of the API gives."""

    success: Literal[False] = False
    error: str


class DocumentValidationProblem(DocumentProblem):
    """422: `error` sums up every problem; `errors` lists them per field."""

    errors: list[FieldError] = Field(default_factory=list)


class DocumentOverBudgetProblem(DocumentProblem, BudgetFigures):
    """402 in the document style, with the same figures."""


def document_problems(*codes: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """`problems` for the routes that answer errors in the document style."""
    texts = {**_PROBLEMS, **(described or {})}
    models: dict[int, type[DocumentProblem]] = {422: DocumentValidationProblem, 402: DocumentOverBudgetProblem}
    return {code: {"model": models.get(code, DocumentProblem), "description": texts[code]} for code in codes}


def either_problems(*codes: int, described: dict[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """`problems` for the routes both styles share: each error in the style it was asked in."""
    native, document = problems(*codes, described=described), document_problems(*codes, described=described)
    return {code: {**native[code], "model": native[code]["model"] | document[code]["model"]} for code in native}


# What every /api route may answer besides its own success and errors.
API_PROBLEMS = problems(400, 401, 413, 422, 503)
DOCUMENT_API_PROBLEMS = document_problems(400, 401, 413, 422, 503)
EITHER_API_PROBLEMS = either_problems(400, 401, 413, 422, 503)
