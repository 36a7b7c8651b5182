""".env.example against the settings, compose and the worker."""

import re

import pytest
from pydantic import AliasChoices

from shared.settings import Settings
from tests.deploy_files import (
    ROOT,
    settings_env_names,
)

# --- .env.example ---------------------------------------------------------------------------

ENV_EXAMPLE = ROOT / ".env.example"
# `NAME=value` or `#NAME=value` is a setting; a `# text` line is a comment.
ENV_LINE = re.compile(r"^#?([A-Z][A-Z0-9_]*)=")
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)")


def env_example_names() -> list[str]:
    return [m.group(1) for line in ENV_EXAMPLE.read_text().splitlines() if (m := ENV_LINE.match(line))]


def compose_variables() -> set[str]:
    """The variables docker compose fills in from the environment or .env."""
    return set(COMPOSE_VARIABLE.findall((ROOT / "docker-compose.yml").read_text()))


def worker_env_names() -> set[str]:
    """The variables the RunPod worker reads (set on the endpoint, not on the services)."""
    text = "\n".join(path.read_text() for path in (ROOT / "worker").glob("*.py"))
    return set(re.findall(r"""(?:env(?:iron)?\.get|_number)\(\s*["']([A-Z][A-Z0-9_]*)["']""", text))


def test_env_example_names_only_variables_something_reads() -> None:
    known = settings_env_names() | compose_variables() | worker_env_names()
    names = env_example_names()
    assert names, "no settings found in .env.example"
    assert [name for name in names if name not in known] == []
    assert len(names) == len(set(names)), "a variable is listed twice"


def test_every_setting_is_in_env_example() -> None:
    listed = set(env_example_names())
    missing = []
    for name, field in Settings.model_fields.items():
        names = {f"BUNCH_{name.upper()}"}
        if isinstance(field.validation_alias, AliasChoices):
            names = {str(choice) for choice in field.validation_alias.choices}
        if not names & listed:
            missing.append(f"BUNCH_{name.upper()}")
    assert missing == [], f"add these to .env.example: {missing}"


def test_env_example_lists_every_compose_variable_and_worker_knob() -> None:
    listed = set(env_example_names())
    assert sorted(compose_variables() - listed) == []
    assert sorted(worker_env_names() - listed) == []


def test_every_env_example_setting_has_a_comment_line_above() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for index, line in enumerate(lines):
        if ENV_LINE.match(line):
            above = lines[index - 1] if index else ""
            assert above.startswith("# ") and not ENV_LINE.match(above), f"line {index + 1}: {line}"


def test_env_example_defaults_are_accepted_by_settings() -> None:
    """Uncommenting every services' line as it is must give valid settings."""
    known = settings_env_names()
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if (m := ENV_LINE.match(line)) and m.group(1) in known:
            value = line.split("=", 1)[1]
            if value:
                values[m.group(1)] = value
    with pytest.MonkeyPatch.context() as patch:
        for key in known:
            patch.delenv(key, raising=False)
        for key, value in values.items():
            patch.setenv(key, value)
        settings = Settings(_env_file=None)
    assert settings.max_concurrency >= 1
