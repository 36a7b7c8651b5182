"""deploy/k8s, checked without a cluster: the base's files as written, and what kustomize renders
from the overlays (with kubectl from CHECKS_BIN, .venv-checks or PATH; those tests skip without it).
deploy/checks/k8s.sh adds strict schema validation and checkov."""

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import keys
from shared.settings import Settings
from tests.deploy_files import (
    BUNCH_IMAGE,
    K8S,
    K8S_BASE,
    KEDA_COMPONENT,
    OVERLAYS,
    PRODUCTION,
    PRODUCTION_KEDA,
    REDIS_COMPONENTS,
    SECRET_TEMPLATE,
    SERVICES,
    all_containers,
    bunch_containers,
    compose,
    config_directives,
    deployed_objects,
    image_name,
    k8s_files,
    k8s_object,
    k8s_objects,
    kubectl,
    kustomization,
    memory_bytes,
    pod_containers,
    pod_spec_of,
    pod_templates,
    redis_template,
    rendered,
    secret_file_variables,
    secret_templates,
    settings_env_names,
    yaml_documents,
)

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Volume types the `restricted` Pod Security Standard allows
# (https://kubernetes.io/docs/concepts/security/pod-security-standards/, "Volume Types").
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
RESTRICTED_VOLUMES |= {"secret"}
SECRET_MODES = {0o400, 0o440}


def gateway_has_route(path: str, method: str = "GET") -> bool:
    from starlette.routing import Match

    from services.gateway.app import create_app

    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in create_app().router.routes)


def deployment(name: str, objects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return k8s_object("Deployment", name, objects)


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec_of(workload)["containers"]
    return container


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def pod_labels(objects: list[dict[str, Any]] | None = None) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects or k8s_objects()
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def overlay_config() -> dict[str, str]:
    """The installation's settings the production overlay merges into `bunch-config`."""
    (patch,) = yaml_documents(PRODUCTION / "config.yaml")
    data: dict[str, str] = patch["data"]
    return data


# --- layout ---------------------------------------------------------------------------------


def test_base_overlays_and_component_are_kustomizations_of_what_exists() -> None:
    listed = kustomization(K8S_BASE)["resources"]
    assert all((K8S_BASE / name).is_file() for name in listed)
    manifests = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(listed) == sorted(manifests)  # every manifest of the base is deployed
    production = kustomization(PRODUCTION)
    assert "../../base" in production["resources"] and production["namespace"]
    keda = kustomization(PRODUCTION_KEDA)
    assert keda["resources"] == ["../production"] and keda["components"] == ["../../components/keda"]
    assert keda["namespace"] == production["namespace"]
    assert kustomization(KEDA_COMPONENT)["kind"] == "Component"
    # The Secrets are a template only: no kustomization applies them.
    for directory in (K8S_BASE, PRODUCTION, PRODUCTION_KEDA, KEDA_COMPONENT):
        assert "secret" not in (directory / "kustomization.yaml").read_text().split("#")[0].lower()
    assert {doc["kind"] for doc in yaml_documents(SECRET_TEMPLATE)} == {"Secret"}


def test_every_base_manifest_is_named_objects_without_a_namespace() -> None:
    for path in k8s_files():
        for doc in yaml_documents(path):
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
            assert "namespace" not in doc["metadata"], path  # the overlay chooses it


def test_every_overlay_renders_into_its_namespace() -> None:
    for overlay in sorted(p for p in OVERLAYS.iterdir() if p.is_dir()):
        namespace = kustomization(overlay)["namespace"]
        objects = rendered(overlay)
        (ns,) = [o for o in objects if o["kind"] == "Namespace"]
        assert ns["metadata"]["name"] == namespace
        assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] != "Namespace")


# --- images ---------------------------------------------------------------------------------


def test_images_are_plain_names_in_the_base_and_digests_once_deployed() -> None:
    for _, container in pod_containers() + [
        (name, c) for name, spec in pod_templates() for c in spec.get("initContainers", [])
    ]:
        assert ":" not in container["image"] and "@" not in container["image"], container["image"]
    images = {entry["name"]: entry for entry in kustomization(K8S_BASE)["images"]}
    assert DIGEST.match(images["redis"]["digest"]) and images["redis"]["newTag"].startswith("7.")
    (bunch,) = kustomization(PRODUCTION)["images"]
    assert bunch["name"] == BUNCH_IMAGE and bunch["newName"] and DIGEST.match(bunch["digest"])
    assert "kustomize edit set image" in (PRODUCTION / "kustomization.yaml").read_text()
    assert "kustomize edit set image" in (K8S / "README.md").read_text()
    for obj in rendered(PRODUCTION_KEDA):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            for container in all_containers(pod_spec_of(obj)):
                name, _, digest = container["image"].partition("@")
                assert DIGEST.match(digest) and not name.endswith(":latest"), container["image"]
                assert container["imagePullPolicy"] == "IfNotPresent"


def test_k8s_commands_are_the_compose_commands_and_name_real_modules() -> None:
    services = compose()["services"]
    containers = dict(pod_containers())
    for name in SERVICES:
        command = containers[name]["command"]
        assert command == services[name]["command"], name
        assert containers[name]["image"] == BUNCH_IMAGE == image_name(services[name]["image"])
    for name, container in bunch_containers():
        command = container["command"]
        assert command[:2] == ["python", "-m"] and importlib.util.find_spec(command[2]) is not None, name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert "exec" not in container.get(probe, {}), (name, probe)  # HTTP probes: no Python per probe


# --- probes and shutdown --------------------------------------------------------------------


def test_gateway_probes_hit_routes_the_gateway_has_on_its_port() -> None:
    gateway = container_of(deployment("gateway"))
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    command = gateway["command"]
    assert ports["http"] == int(command[command.index("--port") + 1])
    probes = {kind: gateway[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    # Liveness asks the process only; readiness also Redis (services/gateway/routes/operations.py).
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ports or probe["port"] in ports.values()
        assert gateway_has_route(probe["path"]), probe["path"]
    assert not gateway_has_route("/no-such-route")


def test_gateway_leaves_the_endpoints_before_it_drains() -> None:
    spec = pod_spec_of(deployment("gateway"))
    command = container_of(deployment("gateway"))["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"  # python:3.11-slim has it; the image has no shell tricks to rely on
    sleep = int(command[1])
    assert sleep >= 5
    # SIGTERM comes after the preStop hook; uvicorn then needs time to finish requests in flight.
    assert spec["terminationGracePeriodSeconds"] >= sleep + 20


def test_workers_probe_their_process_and_redis_over_http_on_the_metrics_port() -> None:
    for name in ("dispatcher", "packager"):
        container = container_of(deployment(name))
        (port,) = container["ports"]
        assert env_values(container)["BUNCH_METRICS_PORT"] == str(port["containerPort"]) == "9100"
        paths = {}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = container[probe]["httpGet"]
            assert http["port"] in (port["name"], port["containerPort"]), (name, probe)
            paths[probe] = http["path"]
        # /livez: the event loop runs; /readyz: Redis answers. (Served by shared/metrics.py's server.)
        assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}


def test_packager_is_killed_only_after_its_zip_grace_has_passed() -> None:
    packager = deployment("packager")
    configured = env_values(container_of(packager)).get("BUNCH_PACKAGER_SHUTDOWN_GRACE_SECONDS")
    grace = float(configured) if configured else Settings.model_fields["packager_shutdown_grace_seconds"].default
    assert grace == Settings(packager_shutdown_grace_seconds=grace).packager_shutdown_grace_seconds
    # Room after the ZIP's grace to abort its multipart upload before SIGKILL.
    assert pod_spec_of(packager)["terminationGracePeriodSeconds"] >= grace + 10


def test_dispatcher_has_time_to_finish_its_step() -> None:
    assert pod_spec_of(deployment("dispatcher"))["terminationGracePeriodSeconds"] >= 20


# --- scaling and disruptions ----------------------------------------------------------------


def test_autoscaled_deployments_leave_the_replica_count_to_their_scaler() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in deployment("gateway")["spec"]  # an apply would reset the HPA's count
    for name in ("dispatcher", "packager"):
        assert deployment(name)["spec"]["replicas"] >= 2  # no scaler in the base: a fixed count
    objects = rendered(PRODUCTION_KEDA)
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    assert sorted(scaled) == ["dispatcher", "packager"]
    for name, scaled_object in scaled.items():
        assert "replicas" not in deployment(name, objects)["spec"]
        assert 2 <= scaled_object["spec"]["minReplicaCount"] < scaled_object["spec"]["maxReplicaCount"]


def test_dispatchers_together_stay_under_runpods_rate_limits() -> None:
    """Each dispatcher takes BUNCH_RUNPOD_LIMIT_SHARE of RunPod's limits: all of them together at
    most 0.9, the default for a single one (the rest is the CLI's and the console's)."""

    def share(objects: list[dict[str, Any]] | None = None) -> float:
        return float(env_values(container_of(deployment("dispatcher", objects)))["BUNCH_RUNPOD_LIMIT_SHARE"])

    assert share() * deployment("dispatcher")["spec"]["replicas"] <= 0.9 + 1e-9
    objects = rendered(PRODUCTION_KEDA)
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject" and o["metadata"]["name"] == "dispatcher"]
    assert share(objects) * scaled["spec"]["maxReplicaCount"] <= 0.9 + 1e-9


def test_every_workload_has_a_disruption_budget_and_spreads_over_zones_and_nodes() -> None:
    labels = pod_labels()
    assert sorted(labels) == sorted([*SERVICES, *REDIS_COMPONENTS])
    budgets = [o for o in k8s_objects() if o["kind"] == "PodDisruptionBudget"]
    for name, pod in labels.items():
        (budget,) = [b for b in budgets if selects(b["spec"]["selector"], pod)]
        assert budget["apiVersion"] == "policy/v1" and budget["spec"]["maxUnavailable"] == 1, name
        spec = pod_spec_of(k8s_object("Deployment" if name in SERVICES else "StatefulSet", name))
        spread = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
        assert sorted(spread) == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"], name
        for constraint in spread.values():
            assert constraint["maxSkew"] == 1 and selects(constraint["labelSelector"], pod), name
            assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
            if name in SERVICES:  # a rolling update's new pods spread among themselves
                assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_every_container_has_resource_requests_and_limits() -> None:
    for name, spec in pod_templates():
        for container in all_containers(spec):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (name, container["name"], part)


def test_services_point_at_what_exists() -> None:
    workloads = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")}
    for service in (o for o in k8s_objects() if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [
            w for w in workloads.values() if selects({"matchLabels": selector}, pod_labels()[w["metadata"]["name"]])
        ]
        assert matching, service["metadata"]["name"]
        container_ports = [p for w in matching for c in pod_spec_of(w)["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in container_ports), port
    for workload in workloads.values():
        assert selects(workload["spec"]["selector"], pod_labels()[workload["metadata"]["name"]])


# --- Pod Security Standard `restricted` -----------------------------------------------------


def restricted_problems(spec: dict[str, Any]) -> list[str]:
    """What in a pod spec the `restricted` Pod Security Standard refuses, plus a read-only root
    filesystem for every container (the review asks for it; PSS does not)."""
    problems = []
    pod = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(flag)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {kinds}")
    if pod.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    for container in all_containers(spec):
        name = container["name"]
        context = container.get("securityContext", {})
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            problems.append(f"{name}: uid 0")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities not dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities added")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root filesystem")
        if any("hostPort" in port for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    templates = pod_templates(deployed_objects())
    assert len(templates) >= len(SERVICES) + len(REDIS_COMPONENTS)
    for name, spec in templates:
        assert restricted_problems(spec) == [], name
        assert spec["automountServiceAccountToken"] is False, name  # none of them uses the API


def test_the_restricted_check_catches_what_it_is_for() -> None:
    (_, spec) = pod_templates()[0]
    for path, value in (
        (("securityContext", "runAsNonRoot"), False),
        (("securityContext", "seccompProfile"), {"type": "Unconfined"}),
        (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True),
        (("containers", 0, "securityContext", "capabilities"), {"drop": ["NET_RAW"]}),
        (("containers", 0, "securityContext", "readOnlyRootFilesystem"), False),
        (("hostNetwork",), True),
        (("volumes",), [{"name": "host", "hostPath": {"path": "/"}}]),
    ):
        changed = yaml.safe_load(yaml.safe_dump(spec))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        if path[:2] == ("securityContext", "runAsNonRoot"):
            for container in all_containers(changed):
                container["securityContext"].pop("runAsNonRoot", None)
        if path[:2] == ("securityContext", "seccompProfile"):
            for container in all_containers(changed):
                container["securityContext"].pop("seccompProfile", None)
        assert restricted_problems(changed), path


def test_services_write_only_to_their_tmp_volume() -> None:
    for name, container in bunch_containers():
        spec = pod_spec_of(deployment(name))
        volumes = {v["name"]: v for v in spec["volumes"]}
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]] and volumes[tmp["name"]]["emptyDir"]["sizeLimit"], name
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp"}, name


def test_redis_pods_start_redis_itself_as_a_non_root_user() -> None:
    """The image's entrypoint would chown and drop root; `command:` skips it, so the pod is never
    root: the command runs redis-server (or sh, for redis.sh) as the pod's user."""
    for component in REDIS_COMPONENTS:
        spec = pod_spec_of(k8s_object("StatefulSet", component))
        assert spec["securityContext"]["runAsUser"] > 0 and spec["securityContext"]["runAsNonRoot"] is True
        for container in all_containers(spec):
            assert container["command"][0] in ("redis-server", "sh"), container["command"]
            assert "docker-entrypoint.sh" not in " ".join(container["command"])


def test_production_namespace_enforces_the_restricted_standard() -> None:
    (namespace,) = [d for d in yaml_documents(PRODUCTION / "namespace.yaml") if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == kustomization(PRODUCTION)["namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- settings and secrets -------------------------------------------------------------------


def test_k8s_and_compose_set_only_settings_the_code_reads() -> None:
    known = settings_env_names() | secret_file_variables()
    configmap = k8s_object("ConfigMap", "bunch-config")
    names = set(configmap["data"]) | set(overlay_config()) | set(compose()["x-bunch-env"])
    objects = rendered(PRODUCTION_KEDA) if kubectl() else k8s_objects()
    # Bunch's own containers; the Redis and Sentinel pods' variables are redis.sh's (checked there).
    for _, container in bunch_containers(objects):
        names |= {env["name"] for env in container.get("env", [])}
        for source in container.get("envFrom", []):
            assert set(source) == {"configMapRef"}, source  # no Secret as environment
            assert k8s_object("ConfigMap", source["configMapRef"]["name"])
    assert sorted(names - known) == []
    assert all(isinstance(value, str) for value in [*configmap["data"].values(), *overlay_config().values()])


def test_max_concurrency_is_set_by_the_installation_beside_its_runpod_endpoint() -> None:
    """BUNCH_MAX_CONCURRENCY must equal the RunPod endpoint's max workers: no base value fits all."""
    assert "BUNCH_MAX_CONCURRENCY" not in k8s_object("ConfigMap", "bunch-config")["data"]
    config = overlay_config()
    assert {"BUNCH_MAX_CONCURRENCY", "BUNCH_RUNPOD_ENDPOINT_ID"} <= set(config)
    text = (PRODUCTION / "config.yaml").read_text()
    comment = text[: text.index("BUNCH_MAX_CONCURRENCY:")].rsplit("BUNCH_RUNPOD_ENDPOINT_ID", 1)[1]
    assert "Max Workers" in comment
    if kubectl():
        (configmap,) = [
            o for o in rendered(PRODUCTION) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "bunch-config"
        ]
        assert configmap["data"]["BUNCH_MAX_CONCURRENCY"] == config["BUNCH_MAX_CONCURRENCY"]


def secret_mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """mount path -> {file name: (secret, key)} of the container's Secret volumes."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts: dict[str, dict[str, str]] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})  # a StatefulSet's claim is no Secret
        sources = [s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]
        if "secret" in volume:
            sources.append({"name": volume["secret"]["secretName"], **volume["secret"]})
        if not sources:
            continue
        assert mount.get("readOnly") is True, mount
        mode = volume.get("projected", volume.get("secret", {})).get("defaultMode")
        assert mode in SECRET_MODES, (mount, mode)  # the pod's own group may read, nobody else
        files: dict[str, str] = {}
        for source in sources:
            template = secret_templates()[source["name"]]
            for item in source.get("items") or [{"key": key, "path": key} for key in template]:
                assert item["key"] in template, (source["name"], item)
                files[item["path"]] = f"{source['name']}/{item['key']}"
        mounts[mount["mountPath"]] = files
    return mounts


def test_secrets_reach_the_containers_as_files_never_as_environment() -> None:
    file_variables = secret_file_variables()
    for name, spec in pod_templates():
        pod_group = spec["securityContext"].get("fsGroup")
        for container in all_containers(spec):
            for entry in container.get("env", []):
                assert "secretKeyRef" not in entry.get("valueFrom", {}), (name, entry["name"])
            assert all("secretRef" not in source for source in container.get("envFrom", [])), name
            mounts = secret_mounts(spec, container)
            if mounts:
                assert pod_group is not None, name  # the files' group: the one the container runs in
            for variable, value in env_values(container).items():
                if variable.endswith("_FILE") or variable == "BUNCH_API_KEYS_DIR":
                    folder, _, file = value.rpartition("/")
                    if variable == "BUNCH_API_KEYS_DIR":
                        assert mounts.get(value), (name, variable)
                    else:
                        assert file in mounts.get(folder, {}), (name, variable, value)
                    if variable.startswith("BUNCH_") and variable != "BUNCH_API_KEYS_DIR":
                        assert variable in file_variables, variable  # shared/secret_files.py reads it


def test_each_service_mounts_the_secrets_it_needs() -> None:
    wanted = {
        "gateway": {"webhook-secret", "s3-access-key", "s3-secret-key", "metrics-token", "redis-url"},
        "dispatcher": {
            "webhook-secret",
            "s3-access-key",
            "s3-secret-key",
            "runpod-api-key",
            "gemini-api-key",
            "redis-url",
        },
        "packager": {"webhook-secret", "s3-access-key", "s3-secret-key", "redis-url"},
    }
    for name in SERVICES:
        spec = pod_spec_of(deployment(name))
        (mounts,) = [
            m for path, m in secret_mounts(spec, spec["containers"][0]).items() if path == "/run/secrets/bunch"
        ]
        assert wanted[name] | {"redis-sentinel-password"} == set(mounts), name
        env = env_values(spec["containers"][0])
        assert env["BUNCH_REDIS_URL_FILE"] == "/run/secrets/bunch/redis-url"
    gateway = pod_spec_of(deployment("gateway"))
    assert env_values(gateway["containers"][0])["BUNCH_API_KEYS_DIR"] in secret_mounts(
        gateway, gateway["containers"][0]
    )


def test_secret_template_holds_no_real_secret_and_one_api_key_per_entry() -> None:
    templates = secret_templates()
    assert set(templates) == {"bunch-secrets", "bunch-api-keys", "redis-auth"}
    for secret, data in templates.items():
        for key, value in data.items():
            assert "replace-me" in value, (secret, key)
    for entry, value in templates["bunch-api-keys"].items():
        key, sep, project = value.partition(":")
        assert sep and key and project and "," not in value and not entry.startswith("."), entry
    for doc in yaml_documents(SECRET_TEMPLATE):
        assert "data" not in doc  # stringData only: readable placeholders


def test_api_keys_folder_is_read_as_the_gateway_reads_it(tmp_path: Path) -> None:
    """The template's `bunch-api-keys`, mounted as Kubernetes mounts a Secret (entries beside the
    hidden `..data` links), gives the gateway each entry's key."""
    data = tmp_path / "..2025_01_01_00_00_00.000000000"
    data.mkdir()
    (tmp_path / "..data").symlink_to(data.name)
    for entry, value in secret_templates()["bunch-api-keys"].items():
        (data / entry).write_text(value)
        (tmp_path / entry).symlink_to(f"..data/{entry}")
    settings = Settings(api_keys_dir=tmp_path, api_keys="")
    expected = dict(value.split(":") for value in secret_templates()["bunch-api-keys"].values())
    assert settings.project_for_key() == expected


# --- Redis ----------------------------------------------------------------------------------


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = k8s_object("StatefulSet", "redis")
    container = container_of(redis)
    conf = config_directives(redis_template("redis.conf"))
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    (data_dir,) = conf["dir"]
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == data_dir} <= claims
    assert any(m["mountPath"] == data_dir for m in container["volumeMounts"])
    assert k8s_object("Service", redis["spec"]["serviceName"])
    # The services find Redis through the Sentinels (redis-auth's bunch-redis-url), not a fixed address.
    assert "BUNCH_REDIS_URL" not in k8s_object("ConfigMap", "bunch-config")["data"]


def test_redis_has_a_memory_limit_and_never_evicts_state() -> None:
    services = compose()["services"]
    for name in ("redis", "redis-replica"):
        command = services[name]["command"]
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
        assert command[command.index("--maxmemory") + 1]
    conf = config_directives(redis_template("redis.conf"))
    assert conf["maxmemory-policy"] == ["noeviction"]
    limit = memory_bytes(container_of(k8s_object("StatefulSet", "redis"))["resources"]["limits"]["memory"])
    # Room above maxmemory for the replicas' output buffers and the AOF rewrite's copy-on-write.
    assert memory_bytes(conf["maxmemory"][0]) <= 0.75 * limit


# --- network policies -----------------------------------------------------------------------


def policies(objects: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [o for o in objects or k8s_objects() if o["kind"] == "NetworkPolicy"]


def rules_for(pod: dict[str, str], direction: str, objects: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ingress or egress rules of every policy that selects this pod."""
    return [
        rule
        for policy in policies(objects)
        if selects(policy["spec"]["podSelector"], pod) and direction.capitalize() in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get(direction, [])
    ]


def ports_of(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(port.get("protocol", "TCP"), port["port"]) for rule in rules for port in rule.get("ports", [])}


def test_bunch_pods_are_denied_all_traffic_but_what_they_need() -> None:
    labels = pod_labels()
    (deny,) = [p for p in policies() if p["metadata"]["name"] == "bunch-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]
    for name, pod in labels.items():
        assert selects(deny["spec"]["podSelector"], pod), name
        egress = rules_for(pod, "egress")
        assert {("UDP", 53), ("TCP", 53)} <= ports_of(egress), name  # names
        assert {("TCP", 6379), ("TCP", 26379)} <= ports_of(egress), name  # Redis and the Sentinels
        ingress_ports = ports_of(rules_for(pod, "ingress"))
        own_ports = {("TCP", port["containerPort"]) for n, c in pod_containers() if n == name for port in c["ports"]}
        # In on its own ports only (the policy `redis` covers the servers' and Sentinels' ports at once).
        assert own_ports <= ingress_ports, name
        assert ingress_ports - own_ports <= ({("TCP", 6379), ("TCP", 26379)} if name in REDIS_COMPONENTS else set())
    for name in SERVICES:
        assert ("TCP", 443) in ports_of(rules_for(labels[name], "egress")), name  # RunPod, S3, webhooks
    assert ("TCP", 80) in ports_of(rules_for(labels["packager"], "egress"))  # http webhooks
    for name in ("gateway", "dispatcher", *REDIS_COMPONENTS):
        assert ("TCP", 80) not in ports_of(rules_for(labels[name], "egress")), name
    for name in REDIS_COMPONENTS:
        assert ("TCP", 443) not in ports_of(rules_for(labels[name], "egress")), name


def test_outside_traffic_never_reaches_instance_metadata() -> None:
    for rule in [r for p in policies() for r in p["spec"].get("egress", [])]:
        for peer in rule.get("to", []):
            if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0":
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]


def test_redis_is_reachable_from_bunch_pods_only_and_metrics_from_monitoring() -> None:
    labels = pod_labels()
    for name in REDIS_COMPONENTS:
        peers = [peer for rule in rules_for(labels[name], "ingress") for peer in rule["from"]]
        assert peers == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bunch"}}}], name
    for name in ("dispatcher", "packager"):
        (rule,) = rules_for(labels[name], "ingress")
        (peer,) = rule["from"]
        assert peer["namespaceSelector"]["matchLabels"] == {"bunch/metrics-scraper": "true"}
        assert ports_of([rule]) == {("TCP", 9100)}
    (gateway,) = rules_for(labels["gateway"], "ingress")
    assert "from" not in gateway and ports_of([gateway]) == {("TCP", 8000)}  # clients and RunPod
    readme = (K8S / "README.md").read_text()
    assert "bunch/metrics-scraper" in readme


# --- KEDA -----------------------------------------------------------------------------------


def test_keda_scales_each_service_on_the_streams_its_groups_read() -> None:
    objects = rendered(PRODUCTION_KEDA)
    namespace = kustomization(PRODUCTION_KEDA)["namespace"]
    consumed = set(keys.CONSUMED_STREAMS)
    groups = {"dispatcher": {keys.DISPATCHER_GROUP}, "packager": {keys.PACKAGER_GROUP, keys.NOTIFIER_GROUP}}
    auth = {o["metadata"]["name"]: o for o in objects if o["kind"] == "TriggerAuthentication"}
    (read,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "redis-read"]
    assert selects({"matchLabels": read["spec"]["selector"]}, pod_labels(objects)["redis"])
    for scaled in (o for o in objects if o["kind"] == "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        streams = set()
        for trigger in scaled["spec"]["triggers"]:
            metadata = trigger["metadata"]
            assert trigger["type"] == "redis-streams"
            assert (metadata["stream"], metadata["consumerGroup"]) in consumed, metadata
            assert metadata["consumerGroup"] in groups[target]
            assert int(metadata["lagCount"]) >= 1 and int(metadata["activationLagCount"]) >= 1
            # KEDA's operator resolves it from its own namespace: the address names Bunch's.
            assert metadata["address"] == f"redis-read.{namespace}.svc:{read['spec']['ports'][0]['port']}"
            (ref,) = auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
            assert ref["parameter"] == "password" and ref["key"] in secret_templates()[ref["name"]]
            streams.add(metadata["stream"])
        assert streams == {s for s, g in keys.CONSUMED_STREAMS if g in groups[target]} - {keys.CONTROL_STREAM}
    allowed = [p for p in policies(objects) if p["metadata"]["name"] == "redis-from-keda"]
    (rule,) = allowed[0]["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}]
    assert ports_of([rule]) == {("TCP", 6379)}


def test_keda_addresses_follow_the_overlays_namespace(tmp_path: Path) -> None:
    """Another installation's overlay, in its own namespace, with the component on top of it (as
    overlays/production-keda): the triggers' address names that namespace."""
    if kubectl() is None:
        pytest.skip("kubectl is not installed")
    layers = {
        "elsewhere": f"namespace: elsewhere\nresources: [{os.path.relpath(K8S_BASE, tmp_path / 'elsewhere')}]\n",
        "elsewhere-keda": "namespace: elsewhere\nresources: [../elsewhere]\n"
        f"components: [{os.path.relpath(KEDA_COMPONENT, tmp_path / 'elsewhere-keda')}]\n",
    }
    for name, body in layers.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "kustomization.yaml").write_text(f"kind: Kustomization\n{body}")
    objects = rendered(tmp_path / "elsewhere-keda")
    triggers = [t for o in objects if o["kind"] == "ScaledObject" for t in o["spec"]["triggers"]]
    assert triggers and {t["metadata"]["address"] for t in triggers} == {"redis-read.elsewhere.svc:6379"}


def test_readme_documents_what_an_operator_must_do() -> None:
    readme = (K8S / "README.md").read_text()
    for topic in ("kustomize edit set image", "BUNCH_API_KEYS_DIR", "components/keda", "restricted", "NetworkPolicy"):
        assert topic in readme, topic
    for path in re.findall(r"`((?:base|overlays|components)/[\w./-]+)`", readme):
        assert (K8S / path).exists(), path
