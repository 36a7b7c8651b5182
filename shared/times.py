"""Unix seconds (how Redis records every moment) as UTC datetimes and ISO 8601 strings."""

from datetime import UTC, datetime
from typing import overload


# The overloads let a caller with a moment that is always set (a finished image) get a plain datetime.
@overload
def utc(seconds: float) -> datetime: ...
@overload
def utc(seconds: float | None) -> datetime | None: ...
def utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


@overload
def iso(seconds: float) -> str: ...
@overload
def iso(seconds: float | None) -> str | None: ...
def iso(seconds: float | None) -> str | None:
    """ISO 8601 ending in "Z", as pydantic writes a UTC datetime: bodies built by hand (manifests,
    webhooks) and the API's models then spell a moment the same way."""
    moment = utc(seconds)
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
