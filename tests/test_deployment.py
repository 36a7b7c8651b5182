"""What can be checked of the deployment files without a Docker engine."""

import importlib.util
import re

import pytest
import yaml
from pydantic import AliasChoices

from shared.settings import Settings
from tests.deploy_files import (
    K8S,
    ROOT,
    SERVICES,
    bunch_containers,
    compose,
    config_directives,
    k8s_files,
    k8s_object,
    k8s_objects,
    memory_bytes,
    pod_containers,
    redis_template,
    settings_env_names,
)


def test_compose_commands_name_real_modules() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, (name, command)
            if "--handler" in command:
                assert (ROOT / command[command.index("--handler") + 1]).is_file()


def test_compose_sets_only_settings_the_code_reads() -> None:
    known = settings_env_names()
    env = compose()["x-bunch-env"]
    unknown = [key for key in env if key.startswith("BUNCH_") and key not in known]
    assert not unknown, unknown


def test_compose_redis_keeps_an_append_only_file() -> None:
    redis = compose()["services"]["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]


def test_every_long_running_service_has_a_healthcheck_and_restart_policy() -> None:
    services = compose()["services"]
    for name in ("redis", "minio", "gateway", "dispatcher", "packager"):
        assert "healthcheck" in services[name], name
        assert services[name].get("restart") == "unless-stopped", name


def test_dockerfiles_exist_and_copy_what_they_run() -> None:
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            dockerfile = ROOT / build["dockerfile"]
            assert dockerfile.is_file(), name
            text = dockerfile.read_text()
            assert "COPY shared shared" in text and "COPY services services" in text
    worker = (ROOT / "worker" / "Dockerfile").read_text()
    assert "handler.py" in worker and "requirements.txt" in worker


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


def gateway_has_route(path: str, method: str = "GET") -> bool:
    from starlette.routing import Match

    from services.gateway.app import create_app

    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in create_app().router.routes)


def test_every_k8s_yaml_parses_into_named_objects_without_a_namespace() -> None:
    assert {path.name for path in k8s_files()} >= {
        "configmap.yaml",
        "secret.example.yaml",
        "gateway.yaml",
        "dispatcher.yaml",
        "packager.yaml",
        "redis.yaml",
    }
    for path in sorted(K8S.glob("*.yaml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert docs, path
        if path.name == "kustomization.yaml":
            continue
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
            assert "namespace" not in doc["metadata"], path


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert all((K8S / name).is_file() for name in listed)
    assert sorted(listed) == sorted(p.name for p in k8s_files() if p.name != "secret.example.yaml")


def test_k8s_commands_are_the_compose_commands_and_name_real_modules() -> None:
    services = compose()["services"]
    containers = dict(pod_containers())
    for name in SERVICES:
        command = containers[name]["command"]
        assert command == services[name]["command"], name
        assert containers[name]["image"] == services[name]["image"] == "bunch:latest"
    for name, container in pod_containers():
        commands = [container.get("command") or []]
        for probe in ("readinessProbe", "livenessProbe"):
            commands.append(container.get(probe, {}).get("exec", {}).get("command") or [])
        for command in commands:
            if command[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(command[2]) is not None, (name, command)


def test_gateway_probes_hit_routes_the_gateway_has_on_its_port() -> None:
    (gateway,) = [c for name, c in pod_containers() if name == "gateway"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    command = gateway["command"]
    assert ports["http"] == int(command[command.index("--port") + 1])
    probes = {kind: gateway[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["port"] in ports or probe["port"] in ports.values()
        assert gateway_has_route(probe["path"]), probe["path"]
    assert not gateway_has_route("/no-such-route")


def test_workers_have_exec_probes_and_more_than_one_replica() -> None:
    for name in ("dispatcher", "packager"):
        deployment = k8s_object("Deployment", name)
        assert deployment["spec"]["replicas"] >= 2
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["python", "-m", "shared.probe"]
        assert compose()["services"][name]["healthcheck"]["test"] == ["CMD", "python", "-m", "shared.probe"]


def test_every_container_has_resource_requests_and_limits() -> None:
    init_containers = [
        (obj["metadata"]["name"], container)
        for obj in k8s_objects()
        if obj["kind"] in ("Deployment", "StatefulSet")
        for container in obj["spec"]["template"]["spec"].get("initContainers", [])
    ]
    for name, container in pod_containers() + init_containers:
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), (name, part)


def test_services_and_hpa_point_at_what_exists() -> None:
    workloads = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] in ("Deployment", "StatefulSet")}
    for service in (o for o in k8s_objects() if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [
            w for w in workloads.values() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matching, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            container_ports = [
                p for w in matching for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
            ]
            assert any(target in (p.get("name"), p["containerPort"]) for p in container_ports), port
    for workload in workloads.values():
        assert (
            workload["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
        )
    hpa = k8s_object("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment" and hpa["spec"]["scaleTargetRef"]["name"] in workloads
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = k8s_object("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    conf = config_directives(redis_template("redis.conf"))
    assert conf["appendonly"] == ["yes"] and conf["appendfsync"] == ["everysec"]
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    (data_dir,) = conf["dir"]
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == data_dir} <= claims
    assert any(m["mountPath"] == data_dir for m in container["volumeMounts"])
    assert k8s_object("Service", redis["spec"]["serviceName"])
    # The services find Redis through the Sentinels (redis-auth's bunch-redis-url), not a fixed address.
    assert "BUNCH_REDIS_URL" not in k8s_object("ConfigMap", "bunch-config")["data"]


def test_k8s_and_compose_set_only_settings_the_code_reads() -> None:
    known = settings_env_names()
    configmap = k8s_object("ConfigMap", "bunch-config")
    secret = k8s_object("Secret", "bunch-secrets")
    names = set(configmap["data"]) | set(secret["stringData"]) | set(compose()["x-bunch-env"])
    # Bunch's own containers; the Redis and Sentinel pods' variables are redis.sh's (checked below).
    for _, container in bunch_containers():
        names |= {env["name"] for env in container.get("env", [])}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef") or source.get("secretRef")
            kind = "ConfigMap" if "configMapRef" in source else "Secret"
            assert k8s_object(kind, ref["name"])
    assert sorted(names - known) == []
    assert all(isinstance(value, str) for value in configmap["data"].values())


def test_secret_template_holds_no_real_secret() -> None:
    secret = k8s_object("Secret", "bunch-secrets")
    assert "data" not in secret  # stringData only: readable placeholders
    for key, value in secret["stringData"].items():
        assert "replace-me" in value, key


def test_redis_has_a_memory_limit_and_never_evicts_state() -> None:
    services = compose()["services"]
    for name in ("redis", "redis-replica"):
        command = services[name]["command"]
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
        assert command[command.index("--maxmemory") + 1]
    conf = config_directives(redis_template("redis.conf"))
    assert conf["maxmemory-policy"] == ["noeviction"]
    (container,) = k8s_object("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"]
    limit = memory_bytes(container["resources"]["limits"]["memory"])
    # Room above maxmemory for the replicas' output buffers and the AOF rewrite's copy-on-write.
    assert memory_bytes(conf["maxmemory"][0]) <= 0.75 * limit
