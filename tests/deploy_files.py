"""The deployment files as data: docker-compose.yml, deploy/k8s/ and its Redis templates."""

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices

from shared.secret_files import SECRET_SETTINGS, file_variable
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def settings_env_names() -> set[str]:
    """Every variable the settings read: BUNCH_<NAME>, the aliases, and BUNCH_<SECRET>_FILE."""
    names = {file_variable(name) for name in SECRET_SETTINGS}
    for name, field in Settings.model_fields.items():
        names.add(f"BUNCH_{name.upper()}")
        if isinstance(field.validation_alias, AliasChoices):
            names.update(str(choice) for choice in field.validation_alias.choices)
    return names


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- Kubernetes manifests -------------------------------------------------------------------

K8S = ROOT / "deploy" / "k8s"
SERVICES = ("gateway", "dispatcher", "packager")


def k8s_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                objects.append(doc)
    return objects


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def pod_containers() -> list[tuple[str, dict[str, Any]]]:
    return [
        (obj["metadata"]["name"], container)
        for obj in k8s_objects()
        if obj["kind"] in ("Deployment", "StatefulSet")
        for container in obj["spec"]["template"]["spec"]["containers"]
    ]


def bunch_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, c in pod_containers() if c["image"] == "bunch:latest"]


# --- Redis behind Sentinel -----------------------------------------------------------------
# deploy/k8s: the `redis` StatefulSet (a primary, two replicas) and `redis-sentinel` (three
# Sentinels), configured by redis/redis.sh from the templates next to it; docker-compose.yml: one
# Redis server, plus a replica and three Sentinels under the `ha` profile. The last tests run those
# very configs on the local redis-server and have the Sentinels fail over.

REDIS_DIR = K8S / "redis"
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
