"""The worker image installs exactly the versions this environment tests (worker/requirements.txt, the
hashed lock compiled from worker/requirements.in: requirements/README.md)."""

import ast
import sys
from importlib import metadata

from tests.deploy_files import ROOT
from tests.test_lock_files import WORKER_IN, WORKER_LOCK, direct_requirements, normalize, read_lock

WORKER = ROOT / "worker"
# What the worker imports: each must be a direct requirement, not merely pulled in by another.
DIRECT_DEPENDENCIES = {"runpod", "google-genai", "aiohttp", "pydantic", "httpx"}


def third_party_imports() -> set[str]:
    """The top-level modules worker/*.py imports that are neither its own nor the standard library's."""
    own = {path.stem for path in WORKER.glob("*.py")}
    found: set[str] = set()
    for path in WORKER.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found - own - set(sys.stdlib_module_names) - {"__future__"}


def test_every_direct_dependency_is_pinned_exactly() -> None:
    direct = {normalize(req.name) for req in direct_requirements(WORKER_IN)}
    assert direct == DIRECT_DEPENDENCIES
    assert direct <= set(read_lock(WORKER_LOCK))


def test_every_import_of_the_worker_comes_from_a_direct_dependency() -> None:
    providers = metadata.packages_distributions()
    for module in third_party_imports():
        owners = {normalize(name) for name in providers.get(module, [])}
        assert owners & DIRECT_DEPENDENCIES, f"worker/ imports {module} ({owners}): name it in worker/requirements.in"


def test_pins_match_the_installed_versions() -> None:
    drift = {
        name: f"pinned {pin.version}, installed {metadata.version(name)}"
        for name, pin in read_lock(WORKER_LOCK).items()
        if pin.applies_here() and metadata.version(name) != pin.version
    }
    assert not drift, f"worker/requirements.txt differs from .venv (requirements/README.md): {drift}"
