"""deploy/k8s, checked without a cluster."""

import importlib.util

import yaml

from tests.deploy_files import (
    K8S,
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
