"""The worker image installs exactly the versions this environment tests (worker/requirements.txt)."""

import re
from importlib import metadata

from deploy.processes import ROOT

REQUIREMENTS = ROOT / "worker" / "requirements.txt"
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)$")
# What the worker imports: each must be pinned, not merely pulled in by another package.
DIRECT_DEPENDENCIES = {"runpod", "google-genai", "aiohttp", "pydantic", "httpx"}


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin (name==version): {line!r}"
        found[match["name"].lower()] = match["version"]
    return found


def test_every_direct_dependency_is_pinned_exactly() -> None:
    assert set(pins()) == DIRECT_DEPENDENCIES


def test_pins_match_the_installed_versions() -> None:
    drift = {
        name: f"pinned {pinned}, installed {metadata.version(name)}"
        for name, pinned in pins().items()
        if metadata.version(name) != pinned
    }
    assert not drift, f"worker/requirements.txt differs from .venv (see its header to update): {drift}"
