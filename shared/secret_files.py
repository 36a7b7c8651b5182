"""Secrets read from files: `BUNCH_<NAME>_FILE=/run/secrets/...` instead of `BUNCH_<NAME>`.

The convention of Docker's and Kubernetes' secret mounts (the postgres and redis images read
`POSTGRES_PASSWORD_FILE` the same way): the value never sits in the process environment, where
`/proc/<pid>/environ`, crash reports and `kubectl describe` show it.
"""

import os
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from shared.errors import Misconfigured

# The settings that hold a secret (a password, a key, or a URL that carries one).
SECRET_SETTINGS = (
    "redis_url",
    "redis_sentinel_password",
    "s3_access_key",
    "s3_secret_key",
    "api_keys",
    "webhook_secret",
    "runpod_api_key",
    "gemini_api_key",
    "user_webhook_secret",
    "user_webhook_secret_previous",
    "metrics_token",
)


def file_variable(name: str) -> str:
    return f"BUNCH_{name.upper()}_FILE"


class SecretFiles(PydanticBaseSettingsSource):
    """A settings source: for each secret setting, the contents of the file its `_FILE` variable names."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        path = os.environ.get(file_variable(field_name))
        if not path:
            return None, field_name, False
        direct = f"BUNCH_{field_name.upper()}"
        if os.environ.get(direct):
            raise Misconfigured(f"{direct} and {file_variable(field_name)} are both set: keep one")
        try:
            # Editors and `echo` leave a final newline that is no part of the secret.
            return Path(path).read_text().rstrip("\r\n"), field_name, False
        except OSError as exc:
            raise Misconfigured(f"{file_variable(field_name)}: cannot read {path}: {exc.strerror}") from exc

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in SECRET_SETTINGS:
            field = self.settings_cls.model_fields[name]
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                values[_input_name(field, name)] = value
        return values


def _input_name(field: FieldInfo, name: str) -> str:
    """The name validation accepts for the field: its first alias when it has any."""
    alias = field.validation_alias
    choices = getattr(alias, "choices", None)
    if choices:
        return str(choices[0])
    return name
