"""The deployment files as data: docker-compose.yml, deploy/k8s/ and its Redis templates."""

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices

from shared.secret_files import SECRET_SETTINGS, file_variable
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"BUNCH_{name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice) for choice in field.validation_alias.choices)
    return names


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- Kubernetes manifests -------------------------------------------------------------------
# deploy/k8s: a kustomize base (no namespace, Bunch's image by its plain name), the overlays that
# deploy it (production; production-keda, which adds components/keda), and secret.example.yaml,
# the template of the Secrets, which no kustomization applies.

K8S = ROOT / "deploy" / "k8s"
K8S_BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
PRODUCTION = OVERLAYS / "production"
PRODUCTION_KEDA = OVERLAYS / "production-keda"
KEDA_COMPONENT = K8S / "components" / "keda"
SECRET_TEMPLATE = K8S / "secret.example.yaml"
SERVICES = ("gateway", "dispatcher", "packager")
BUNCH_IMAGE = "bunch"  # the base's name for Bunch's image; the overlays pin it by digest
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return document


def k8s_files() -> list[Path]:
    """The base's manifests, as its kustomization lists them."""
    return [K8S_BASE / name for name in kustomization(K8S_BASE)["resources"]]


def k8s_objects() -> list[dict[str, Any]]:
    """The base's objects as written (no namespace, plain image names, `redis-config` unhashed)."""
    return [doc for path in k8s_files() for doc in yaml_documents(path)]


def k8s_object(kind: str, name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [o for o in (objects or k8s_objects()) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def pod_templates(objects: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every workload; a CronJob's job template counts too."""
    templates = []
    for obj in objects or k8s_objects():
        if obj["kind"] in WORKLOAD_KINDS:
            templates.append((obj["metadata"]["name"], pod_spec_of(obj)))
        elif obj["kind"] == "CronJob":
            templates.append((obj["metadata"]["name"], obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return templates


def pod_containers(objects: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(name, container) for name, spec in pod_templates(objects) for container in spec["containers"]]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A pod's init containers and containers."""
    return [*spec.get("initContainers", []), *spec["containers"]]


def bunch_containers(objects: list[dict[str, Any]] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The containers of Bunch's own image (the services), whatever registry and digest pin it."""
    return [(name, c) for name, c in pod_containers(objects) if image_name(c["image"]) == BUNCH_IMAGE]


def image_name(image: str) -> str:
    """`registry.example.com/bunch/bunch:tag@sha256:...` -> `bunch`."""
    path = image.split("@")[0]
    last = path.rsplit("/", 1)[-1]
    return last.split(":")[0]


def secret_templates() -> dict[str, dict[str, str]]:
    """secret.example.yaml's Secrets: name -> stringData."""
    return {doc["metadata"]["name"]: doc["stringData"] for doc in yaml_documents(SECRET_TEMPLATE)}


def secret_file_variables() -> set[str]:
    """BUNCH_<NAME>_FILE of every secret setting (shared/secret_files.py)."""
    return {file_variable(name) for name in SECRET_SETTINGS}


def kubectl() -> str | None:
    """kubectl from $CHECKS_BIN, else from .venv-checks, else from PATH (None: not installed)."""
    for folder in (os.environ.get("CHECKS_BIN"), str(ROOT / ".venv-checks" / "bin")):
        if folder and os.access(Path(folder) / "kubectl", os.X_OK):
            return str(Path(folder) / "kubectl")
    return shutil.which("kubectl")


@functools.cache
def _kustomize(directory: Path) -> str:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed (CHECKS_BIN, .venv-checks/bin or PATH)")
    built = subprocess.run([binary, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return built.stdout


def rendered(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`, as objects (the test is skipped without kubectl)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(directory)) if doc is not None]


def deployed_objects() -> list[dict[str, Any]]:
    """What the overlays deploy (production-keda adds to production), or the base's files without kubectl."""
    if kubectl() is None:
        return k8s_objects()
    return rendered(PRODUCTION) + rendered(PRODUCTION_KEDA)


# --- Redis behind Sentinel -----------------------------------------------------------------
# deploy/k8s: the `redis` StatefulSet (a primary, two replicas) and `redis-sentinel` (three
# Sentinels), configured by redis/redis.sh from the templates next to it; docker-compose.yml: one
# Redis server, plus a replica and three Sentinels under the `ha` profile. The last tests run those
# very configs on the local redis-server and have the Sentinels fail over.

REDIS_DIR = K8S_BASE / "redis"
MASTER = "bunch"
REDIS_COMPONENTS = ("redis", "redis-sentinel")
SENTINEL_SERVICES = ("sentinel-1", "sentinel-2", "sentinel-3")
# Redis's units (1mb = 1024 * 1024, 1m = 10**6) and Kubernetes's (Mi, M).
MEMORY_UNITS = {"": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
MEMORY_UNITS |= {"ki": 1024, "mi": 1024**2, "gi": 1024**3}


def redis_template(name: str) -> str:
    return (REDIS_DIR / name).read_text()


def config_directives(text: str) -> dict[str, list[str]]:
    """A Redis or Sentinel config's directives: `sentinel monitor` and the like keep two words."""
    directives: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        size = 2 if words[0] == "sentinel" else 1
        directives.setdefault(" ".join(words[:size]), []).append(" ".join(words[size:]))
    return directives


def memory_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text)
    assert match, text
    return int(match.group(1)) * MEMORY_UNITS[match.group(2).lower()]
