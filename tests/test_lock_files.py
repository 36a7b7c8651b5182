"""The hashed lock files (requirements/README.md): complete, hashed, in agreement with each other,
with pyproject.toml and with what this environment runs; and each image's lock holds only what its
own direct dependencies need."""

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.deploy_files import ROOT

PROJECT = "bunch"
PYPROJECT = ROOT / "pyproject.toml"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
SERVICE_LOCK = ROOT / "requirements" / "service.txt"
EMULATORS_IN = ROOT / "requirements" / "emulators.in"
EMULATORS_LOCK = ROOT / "requirements" / "emulators.txt"
WORKER_IN = ROOT / "worker" / "requirements.in"
WORKER_LOCK = ROOT / "worker" / "requirements.txt"
LOCKS = (DEV_LOCK, SERVICE_LOCK, EMULATORS_LOCK, WORKER_LOCK)
# The packages only the worker imports: the `worker` extra of pyproject.toml.
WORKER_ONLY = {"runpod"}  # google-genai is the dispatcher's too (the batch lane)

ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)\s*(?:;\s*(?P<marker>.+))?$")
HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Pin:
    version: str
    marker: str | None
    hashes: tuple[str, ...]

    def applies_here(self) -> bool:
        """Whether pip installs this entry on this machine (a universal lock carries other platforms')."""
        return self.marker is None or Marker(self.marker).evaluate()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Pin]:
    """A lock's entries by normalized name; any line that is not an entry, a hash or a comment fails."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())  # join the continuation lines
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *options = line.split(" --hash=")
        match = ENTRY.match(head.strip())
        assert match, f"{path.name}: not an exact pin: {head!r}"
        hashes = tuple(f"--hash={option.strip()}" for option in options)
        assert hashes and all(HASH.match(h) for h in hashes), f"{path.name}: {match['name']} has no sha256 hash"
        name = normalize(match["name"])
        assert name not in pins, f"{path.name}: {name} is pinned twice (a split resolution)"
        pins[name] = Pin(match["version"], match["marker"], hashes)
    assert pins, f"{path.name} pins nothing"
    return pins


def direct_requirements(path: Path) -> list[Requirement]:
    """The requirements of a requirements .in file, following its `-r` includes."""
    found: list[Requirement] = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            found += direct_requirements((path.parent / line[3:].strip()).resolve())
        elif line:
            found.append(Requirement(line))
    return found


def pyproject_requirements(*extras: str) -> list[Requirement]:
    """The main dependencies of pyproject.toml, or those of its extras; the self-reference left out."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = [line for extra in extras for line in project["optional-dependencies"][extra]]
    requirements = [Requirement(line) for line in (lines if extras else project["dependencies"])]
    return [req for req in requirements if normalize(req.name) != PROJECT]


def needed(requirements: list[Requirement]) -> set[str]:
    """What installing these requirements installs on this machine: the closure over the installed
    packages' metadata, each requirement's markers evaluated with its extras."""
    extras_of: dict[str, set[str]] = {}  # each package reached, with the extras asked of it so far
    todo = [(req, {""}) for req in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        name = normalize(req.name)
        wanted = {"", *req.extras}
        if name == PROJECT or wanted <= extras_of.get(name, set()):
            continue
        extras_of.setdefault(name, set()).update(wanted)
        todo += [(Requirement(line), wanted) for line in metadata.requires(req.name) or []]
    return set(extras_of)


def active(path: Path) -> set[str]:
    return {name for name, pin in read_lock(path).items() if pin.applies_here()}


def test_every_lock_entry_is_pinned_and_hashed() -> None:
    for lock in LOCKS:
        read_lock(lock)  # asserts as it reads


def test_a_package_has_one_version_in_every_lock() -> None:
    versions: dict[str, dict[str, str]] = {}
    for lock in LOCKS:
        for name, pin in read_lock(lock).items():
            versions.setdefault(name, {})[lock.name if lock != WORKER_LOCK else "worker/requirements.txt"] = pin.version
    split = {name: seen for name, seen in versions.items() if len(set(seen.values())) > 1}
    assert not split, f"regenerate with requirements/compile.sh: {split}"


def test_every_direct_dependency_is_locked_within_its_specifier() -> None:
    expected = {
        DEV_LOCK: pyproject_requirements() + pyproject_requirements("dev", "bench", "worker"),
        SERVICE_LOCK: pyproject_requirements(),
        WORKER_LOCK: direct_requirements(WORKER_IN),
        EMULATORS_LOCK: direct_requirements(EMULATORS_IN),
    }
    for lock, requirements in expected.items():
        pins = read_lock(lock)
        for req in requirements:
            pin = pins.get(normalize(req.name))
            assert pin, f"{lock.name} lacks {req.name}: regenerate with requirements/compile.sh"
            assert req.specifier.contains(pin.version, prereleases=True), (lock.name, str(req), pin.version)


def test_the_worker_requirements_repeat_pyproject() -> None:
    """worker/requirements.in and the `worker` extra plus the main dependencies say the same."""
    declared = {normalize(r.name): r.specifier for r in pyproject_requirements() + pyproject_requirements("worker")}
    for req in direct_requirements(WORKER_IN):
        assert normalize(req.name) in declared, f"{req.name} is in worker/requirements.in, not in pyproject.toml"
        assert req.specifier == declared[normalize(req.name)], (str(req), str(declared[normalize(req.name)]))
    worker_extra = {normalize(r.name) for r in pyproject_requirements("worker")}
    assert worker_extra == WORKER_ONLY
    assert worker_extra <= {normalize(r.name) for r in direct_requirements(WORKER_IN)}


def test_each_lock_holds_what_its_direct_dependencies_need_and_nothing_else() -> None:
    expected = {
        DEV_LOCK: needed(pyproject_requirements() + pyproject_requirements("dev", "bench", "worker")),
        SERVICE_LOCK: needed(pyproject_requirements()),
        WORKER_LOCK: needed(direct_requirements(WORKER_IN)),
        EMULATORS_LOCK: needed(direct_requirements(EMULATORS_IN)),
    }
    for lock, packages in expected.items():
        assert active(lock) == packages, (lock.name, sorted(active(lock) ^ packages))


def test_the_service_image_has_no_worker_package_and_the_worker_image_no_service_package() -> None:
    assert not WORKER_ONLY & set(read_lock(SERVICE_LOCK))
    assert WORKER_ONLY <= set(read_lock(WORKER_LOCK))
    # Bunch's own dependencies that nothing of the worker's needs (minio, redis, arq, ...).
    service_only = {normalize(r.name) for r in pyproject_requirements()} - needed(direct_requirements(WORKER_IN))
    assert {"minio", "redis", "arq", "stream-zip"} <= service_only
    assert not service_only & set(read_lock(WORKER_LOCK))


def test_this_environment_runs_the_dev_lock() -> None:
    """`make install` installs requirements/dev.txt: the suite tests the locked versions."""
    drift = {
        name: f"locked {pin.version}, installed {metadata.version(name)}"
        for name, pin in read_lock(DEV_LOCK).items()
        if pin.applies_here() and metadata.version(name) != pin.version
    }
    assert not drift, f"reinstall from requirements/dev.txt (requirements/README.md): {drift}"
