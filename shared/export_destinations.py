"""Where a project may export its images: S3-compatible buckets named by the operator.

`BUNCH_EXPORT_DESTINATIONS` (or `BUNCH_EXPORT_DESTINATIONS_FILE`) holds JSON, project -> name -> destination:

    {"team-a": {"archive": {"endpoint": "https://s3.eu-west-1.amazonaws.com", "region": "eu-west-1",
                            "bucket": "team-a-datasets", "prefix": "bunch",
                            "access_key_id_env": "TEAM_A_S3_KEY_ID",
                            "secret_access_key_file": "/run/secrets/team-a-s3-secret"}}}

Only the operator names endpoints: a tenant picks one of its project's destinations by name and can
never make Bunch write anywhere else. Each credential comes from an environment variable (`*_env`)
or a file (`*_file`), so the setting itself holds no secret and the credentials never reach the API.
Any S3-compatible store works: AWS S3, GCS through its S3 interoperability (HMAC keys, endpoint
https://storage.googleapis.com), Cloudflare R2, MinIO, SeaweedFS.
"""

import json
import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, StringConstraints, ValidationError, field_validator

from shared.errors import Misconfigured

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
DestinationName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
# S3's bucket naming rules (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class DestinationSpec(BaseModel):
    """One destination as the operator writes it."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str
    bucket: str
    prefix: str = ""
    region: str = "us-east-1"
    access_key_id_env: str | None = None
    access_key_id_file: Path | None = None
    secret_access_key_env: str | None = None
    secret_access_key_file: Path | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
            raise ValueError("expected a scheme and host, such as https://s3.eu-west-1.amazonaws.com (no path)")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, value: str) -> str:
        if not BUCKET_PATTERN.match(value):
            raise ValueError("not a valid S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        prefix = value.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError("a prefix of path segments such as 'datasets/bunch' (no empty, '.' or '..' parts)")
        return prefix


class Destination(BaseModel):
    """A destination ready to use: its credentials read."""

    model_config = ConfigDict(frozen=True)

    project: str
    name: str
    endpoint: str
    bucket: str
    prefix: str
    region: str
    access_key_id: SecretStr
    secret_access_key: SecretStr

    def key(self, path: str) -> str:
        """The object key of `path` under the destination's prefix."""
        return f"{self.prefix}/{path}" if self.prefix else path


Destinations = dict[str, dict[str, Destination]]  # project -> name -> destination


def parse_destinations(text: str, environ: dict[str, str] | None = None) -> Destinations:
    """The setting's JSON, with every credential read; Misconfigured names what is wrong."""
    if not text.strip():
        return {}
    environ = dict(os.environ) if environ is None else environ
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Misconfigured(f"BUNCH_EXPORT_DESTINATIONS is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise Misconfigured('BUNCH_EXPORT_DESTINATIONS: expected {"<project>": {"<name>": {...}}}')
    destinations: Destinations = {}
    for project, named in raw.items():
        for name, value in named.items():
            where = f"BUNCH_EXPORT_DESTINATIONS[{project!r}][{name!r}]"
            if not re.match(NAME_PATTERN, name):
                raise Misconfigured(f"{where}: a name is letters, digits, '.', '_' and '-' (at most 63)")
            try:
                spec = DestinationSpec.model_validate(value)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors())
                raise Misconfigured(f"{where}: {problems}") from None
            destinations.setdefault(project, {})[name] = Destination(
                project=project,
                name=name,
                endpoint=spec.endpoint,
                bucket=spec.bucket,
                prefix=spec.prefix,
                region=spec.region,
                access_key_id=_credential(where, "access_key_id", spec, environ),
                secret_access_key=_credential(where, "secret_access_key", spec, environ),
            )
    return destinations


def _credential(where: str, name: str, spec: DestinationSpec, environ: dict[str, str]) -> SecretStr:
    variable: str | None = getattr(spec, f"{name}_env")
    path: Path | None = getattr(spec, f"{name}_file")
    if (variable is None) == (path is None):
        raise Misconfigured(f"{where}: give exactly one of {name}_env and {name}_file")
    if variable is not None:
        value = environ.get(variable, "")
        if not value:
            raise Misconfigured(f"{where}: the environment variable {variable} ({name}_env) is not set")
        return SecretStr(value)
    assert path is not None
    try:
        value = path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise Misconfigured(f"{where}: cannot read {name}_file {path}: {exc.strerror}") from None
    if not value:
        raise Misconfigured(f"{where}: {name}_file {path} is empty")
    return SecretStr(value)
