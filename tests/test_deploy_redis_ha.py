"""Redis behind Sentinel in the deployment files, read and run on the local redis-server."""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from deploy.processes import free_port
from tests.deploy_files import (
    K8S_BASE,
    MASTER,
    REDIS_COMPONENTS,
    REDIS_DIR,
    ROOT,
    SENTINEL_SERVICES,
    SERVICES,
    compose,
    config_directives,
    k8s_object,
    k8s_objects,
    redis_template,
    rendered,
    secret_templates,
)


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object("StatefulSet", name)["spec"]["template"]["spec"]
    return spec


def all_containers(name: str) -> list[dict[str, Any]]:
    spec = pod_spec(name)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def pod_names(statefulset: str) -> list[str]:
    """Each pod's stable DNS name in the StatefulSet's headless Service."""
    obj = k8s_object("StatefulSet", statefulset)
    return [f"{statefulset}-{i}.{obj['spec']['serviceName']}" for i in range(obj["spec"]["replicas"])]


def secret_files(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each file path of the container's mounted Secrets -> (Secret, key)."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        sources = [s["secret"] for s in volume.get("projected", {}).get("sources", []) if "secret" in s]
        if "secret" in volume:
            sources.append({"name": volume["secret"]["secretName"], "items": volume["secret"].get("items")})
        for source in sources:
            items = source.get("items") or [{"key": k, "path": k} for k in secret_templates()[source["name"]]]
            for item in items:
                files[f"{mount['mountPath']}/{item['path']}"] = (source["name"], item["key"])
    return files


def secret_of(spec: dict[str, Any], container: dict[str, Any], variable: str) -> tuple[str, str]:
    """The (Secret, key) whose file the `*_FILE` variable names."""
    return secret_files(spec, container)[env_of(container)[variable]["value"]]


def sentinel_lines_of_compose() -> list[str]:
    """The config lines the `ha` profile's Sentinels write on their first start."""
    script = compose()["x-sentinel"]["command"][2]
    return re.findall(r"""['"](sentinel [^'"]+)['"]""", script)


def test_k8s_redis_is_a_primary_with_replicas_and_three_sentinels() -> None:
    redis = k8s_object("StatefulSet", "redis")
    sentinels = k8s_object("StatefulSet", "redis-sentinel")
    assert redis["spec"]["replicas"] >= 3 and sentinels["spec"]["replicas"] == 3
    nodes = " ".join(f"{name}:6379" for name in pod_names("redis"))
    sentinel_addresses = " ".join(f"{name}:26379" for name in pod_names("redis-sentinel"))
    for statefulset in REDIS_COMPONENTS:
        service = k8s_object("Service", k8s_object("StatefulSet", statefulset)["spec"]["serviceName"])
        # Headless, names published before readiness: a syncing replica stays reachable by name.
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        for container in all_containers(statefulset):
            env = env_of(container)
            if "REDIS_NODES" in env:  # the containers that run redis.sh
                assert env["REDIS_NODES"]["value"] == nodes, statefulset
                assert env["SENTINELS"]["value"] == sentinel_addresses, statefulset
                assert env["ANNOUNCE_HOST"]["value"] == f"$(POD_NAME).{service['metadata']['name']}"
                assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (init,) = pod_spec("redis")["initContainers"]
    (server,) = pod_spec("redis")["containers"]
    assert "redis.sh redis-config > /etc/redis/redis.conf" in init["command"][-1]
    assert server["command"] == ["redis-server", "/etc/redis/redis.conf"]
    assert server["readinessProbe"]["exec"]["command"] == ["sh", "/config/redis.sh", "ready"]
    assert server["livenessProbe"]["exec"]["command"] == ["sh", "/config/redis.sh", "alive"]
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "/config/redis.sh", "hand-over"]
    (init,) = pod_spec("redis-sentinel")["initContainers"]
    (sentinel,) = pod_spec("redis-sentinel")["containers"]
    assert "redis.sh sentinel-config > /etc/redis/sentinel.conf" in init["command"][-1]
    assert sentinel["command"] == ["redis-server", "/etc/redis/sentinel.conf", "--sentinel"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert sentinel[probe]["exec"]["command"] == ["sh", "/config/redis.sh", "sentinel-alive"]
    assert sentinel["ports"] == [{"name": "sentinel", "containerPort": 26379}]


def test_k8s_sentinel_settings_follow_the_sentinel_docs() -> None:
    conf = config_directives(redis_template("sentinel.conf"))
    # Hostnames everywhere (pod IPs change): both switches, and the per-instance announce in redis.sh.
    assert conf["sentinel resolve-hostnames"] == ["yes"] and conf["sentinel announce-hostnames"] == ["yes"]
    (monitor,) = conf["sentinel monitor"]
    name, primary, quorum = monitor.split()
    assert (name, primary) == (MASTER, "@PRIMARY@")
    assert int(quorum) == 2  # of 3: a majority, so no lone Sentinel marks the primary down
    assert int(conf["sentinel down-after-milliseconds"][0].split()[1]) <= 10_000
    assert int(conf["sentinel failover-timeout"][0].split()[1]) >= 10_000
    assert conf["sentinel parallel-syncs"] == [f"{MASTER} 1"]
    script = redis_template("redis.sh")
    for line in ("sentinel announce-ip", "sentinel auth-pass", "replica-announce-ip", "requirepass", "masterauth"):
        assert f'echo "{line} ' in script, line
    # The services wait for a replica on their claims and outcomes (WAIT), as there are replicas.
    configmap = k8s_object("ConfigMap", "bunch-config")["data"]
    assert 1 <= int(configmap["BUNCH_REDIS_WAIT_REPLICAS"]) < k8s_object("StatefulSet", "redis")["spec"]["replicas"]


def test_k8s_redis_script_is_posix_shell() -> None:
    result = subprocess.run(["sh", "-n", str(REDIS_DIR / "redis.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_k8s_redis_and_sentinels_spread_and_survive_disruptions() -> None:
    for component in REDIS_COMPONENTS:
        statefulset = k8s_object("StatefulSet", component)
        labels = statefulset["spec"]["template"]["metadata"]["labels"]
        pdb = k8s_object("PodDisruptionBudget", component)
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == statefulset["spec"]["selector"]["matchLabels"]
        # One per zone and per node where the cluster has them; a smaller cluster still runs all.
        spread = {c["topologyKey"]: c for c in pod_spec(component)["topologySpreadConstraints"]}
        assert sorted(spread) == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        for constraint in spread.values():
            assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
            assert constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == component


def test_k8s_redis_and_sentinels_run_locked_down() -> None:
    # The Redis servers as the official image's `redis` (uid 999), who owns the files on their data
    # volumes; the Sentinels, which keep nothing on disk, as a uid no host user has. Both in the
    # image's `redis` group (1000), the group of the mounted Secret's files.
    assert pod_spec("redis")["securityContext"]["runAsUser"] == 999
    assert pod_spec("redis-sentinel")["securityContext"]["runAsUser"] > 10000
    for component in REDIS_COMPONENTS:
        spec = pod_spec(component)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsGroup"] == pod["fsGroup"] == 1000
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in all_containers(component):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["capabilities"]["drop"] == ["ALL"], container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            # What they write, the generated config (and Redis's data), is on volumes.
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/etc/redis" in writable, container["name"]
        # The generated configs hold the passwords: in memory, not on the node's disk.
        (conf,) = [v for v in spec["volumes"] if v["name"] == "conf"]
        assert conf["emptyDir"]["medium"] == "Memory"
    (server,) = pod_spec("redis")["containers"]
    assert "/data" in {m["mountPath"] for m in server["volumeMounts"]}


def test_k8s_redis_auth_comes_from_a_secret_as_files() -> None:
    templates = secret_templates()
    auth = templates["redis-auth"]
    for value in auth.values():
        assert "replace-me" in value  # a template
    referenced = set()
    for obj in k8s_objects():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for entry in container.get("env", []):
                assert "secretKeyRef" not in entry.get("valueFrom", {}), entry  # never in the environment
                if entry["name"].endswith("_FILE"):
                    secret, key = secret_of(spec, container, entry["name"])
                    assert key in templates[secret], (obj["metadata"]["name"], entry)
                    referenced.add((obj["metadata"]["name"], container["name"], entry["name"], key))
    for component in REDIS_COMPONENTS:
        assert (component, "config", "REDIS_PASSWORD_FILE", "redis-password") in referenced
        assert (component, "config", "SENTINEL_PASSWORD_FILE", "sentinel-password") in referenced
    assert ("redis", "redis", "REDIS_PASSWORD_FILE", "redis-password") in referenced
    assert ("redis-sentinel", "sentinel", "SENTINEL_PASSWORD_FILE", "sentinel-password") in referenced
    for name in SERVICES:
        assert (name, name, "BUNCH_REDIS_URL_FILE", "bunch-redis-url") in referenced
        assert (name, name, "BUNCH_REDIS_SENTINEL_PASSWORD_FILE", "sentinel-password") in referenced


def test_k8s_services_reach_the_primary_through_the_sentinels() -> None:
    from shared.redis_connection import parse_sentinel_url

    auth = secret_templates()["redis-auth"]
    address = parse_sentinel_url(auth["bunch-redis-url"])
    assert address is not None and not address.tls
    assert address.master == MASTER
    assert address.password == auth["redis-password"]  # the primary's password: the one Redis requires
    assert list(address.sentinels) == [(name, 26379) for name in pod_names("redis-sentinel")]
    assert all(name.endswith(".redis-sentinel") for name, _ in address.sentinels)  # the Sentinels' Service
    assert k8s_object("Service", "redis-sentinel")["spec"]["ports"][0]["port"] == 26379
    for name in SERVICES:
        spec = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert secret_of(spec, container, "BUNCH_REDIS_URL_FILE") == ("redis-auth", "bunch-redis-url")
        assert secret_of(spec, container, "BUNCH_REDIS_SENTINEL_PASSWORD_FILE") == ("redis-auth", "sentinel-password")


def test_k8s_network_policy_lets_only_bunch_pods_reach_redis() -> None:
    policy = k8s_object("NetworkPolicy", "redis")["spec"]
    assert policy["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": list(REDIS_COMPONENTS)}
    ]
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "bunch"}}}]
    assert sorted(port["port"] for port in rule["ports"]) == [6379, 26379]
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "bunch"


def test_kustomization_generates_the_redis_config_map() -> None:
    kustomization = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == "redis-config"
    assert sorted(generator["files"]) == sorted(f"redis/{p.name}" for p in REDIS_DIR.iterdir())
    for component in REDIS_COMPONENTS:
        volumes = {v["name"]: v for v in pod_spec(component)["volumes"]}
        assert volumes["config"]["configMap"]["name"] == "redis-config"
    objects = rendered(K8S_BASE)
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("redis-")]
    assert set(config_map["data"]) == {"redis.conf", "sentinel.conf", "redis.sh"}
    for obj in objects:
        if obj["kind"] == "StatefulSet":
            names = {v["configMap"]["name"] for v in obj["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
            assert names == {config_map["metadata"]["name"]}  # with its hash: a config change rolls the pods


def test_compose_ha_profile_has_a_replica_and_three_sentinels() -> None:
    file = compose()
    services = file["services"]
    assert "profiles" not in services["redis"]  # the single Redis server is the default
    for name in ("redis-replica", *SENTINEL_SERVICES):
        assert services[name]["profiles"] == ["ha"], name
        assert services[name]["restart"] == "unless-stopped" and "healthcheck" in services[name], name
        assert services[name]["user"] == "redis", name
        assert f"{name}-data" in file["volumes"] and services[name]["volumes"] == [f"{name}-data:/data"]
    assert 'echo "replicaof redis 6379"' in services["redis-replica"]["command"][2]
    replica_flags = services["redis-replica"]["command"][4:]
    assert (
        replica_flags[: replica_flags.index("--replica-announce-ip")]
        == services["redis"]["command"][4 : services["redis"]["command"].index("--replica-announce-ip")]
    )
    for name in SENTINEL_SERVICES:
        assert services[name]["hostname"] == name  # what it announces ($HOSTNAME)
    lines = sentinel_lines_of_compose()
    assert f"sentinel monitor {MASTER} redis 6379 2" in lines
    assert "sentinel announce-ip $$HOSTNAME" in lines
    # The comment that tells how to switch the services to the Sentinels gives a URL that works.
    from shared.redis_connection import parse_sentinel_url

    (url,) = re.findall(r"BUNCH_REDIS_URL=(redis\+sentinel://\S+)", (ROOT / "docker-compose.yml").read_text())
    address = parse_sentinel_url(url)
    assert address is not None and address.master == MASTER
    assert [host for host, port in address.sentinels] == list(SENTINEL_SERVICES)
    assert file["x-bunch-env"]["BUNCH_REDIS_URL"] == "${BUNCH_REDIS_URL:-redis://redis:6379/0}"


def test_compose_and_k8s_sentinels_agree_on_the_settings() -> None:
    k8s = config_directives(redis_template("sentinel.conf"))
    compose_conf = config_directives("\n".join(sentinel_lines_of_compose()))
    for key in ("sentinel down-after-milliseconds", "sentinel failover-timeout", "sentinel parallel-syncs"):
        assert compose_conf[key] == k8s[key], key
    for key in ("sentinel resolve-hostnames", "sentinel announce-hostnames"):
        assert compose_conf[key] == k8s[key] == ["yes"]
    (compose_monitor,) = compose_conf["sentinel monitor"]
    (k8s_monitor,) = k8s["sentinel monitor"]
    # The same master name and quorum (the primary's address differs: `redis`, @PRIMARY@).
    assert compose_monitor.split()[::3] == k8s_monitor.split()[::2] == [MASTER, "2"]


# --- the configs, run: the Sentinels fail over on the local redis-server ------------------------

needs_redis = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli") and shutil.which("timeout")),
    reason="needs redis-server, redis-cli and timeout",
)
FAILOVER_SECONDS = 15  # down-after-milliseconds is 1000 here (see `faster`)
# Appended to the servers' and Sentinels' command lines (where the last setting wins): loopback
# only, and a replica's first sync at once instead of after 5 s of waiting for more replicas.
LOCAL_ARGS = {
    "redis": ["--bind", "127.0.0.1", "--repl-diskless-sync-delay", "0"],
    "redis-sentinel": ["--bind", "127.0.0.1"],
}


def local_host() -> str:
    """`localhost` when it is only 127.0.0.1 (so the hostname settings are exercised), else the IP."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    except OSError:
        return "127.0.0.1"
    return "localhost" if addresses == {"127.0.0.1"} else "127.0.0.1"


def substitute(text: str, pattern: str, replacement: str) -> str:
    """`text` with the one match of `pattern` replaced: a config that changed shape fails loudly."""
    result, count = re.subn(pattern, replacement, text)
    assert count == 1, (pattern, text)
    return result


def faster(text: str) -> str:
    """Production timings of a Sentinel config, shortened so a failover takes seconds."""
    text = substitute(text, r"(down-after-milliseconds \S+) \d+", r"\g<1> 1000")
    return substitute(text, r"(failover-timeout \S+) \d+", r"\g<1> 3000")


def compose_value(text: str) -> str:
    """What compose makes of `text`: `$$` is `$`, `${NAME:-default}` the default."""
    return re.sub(r"\$\$|\$\{[A-Z0-9_]+:-([^}]*)\}", lambda m: "$" if m.group(0) == "$$" else m.group(1), text)


class Processes:
    """Processes of one test, each logging to a file, all killed at its end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        self.started[name] = proc
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            for path in sorted(self.directory.glob("*.log"))
        )

    def wait_until(self, what: str, condition: Callable[[], object], timeout: float = 20.0) -> float:
        """Poll until `condition()` is true; the seconds it took. Fails with the logs' tails."""
        started = time.monotonic()
        while not condition():
            for name, proc in self.started.items():
                if proc.poll() is not None and name not in self.stopped:
                    pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if time.monotonic() - started > timeout:
                pytest.fail(f"no {what} within {timeout} s\n{self.logs()}")
            time.sleep(0.05)
        return time.monotonic() - started

    def stop(self, name: str, sig: signal.Signals) -> None:
        self.stopped.add(name)
        self.started[name].send_signal(sig)
        self.started[name].wait(timeout=20)

    def close(self) -> None:
        for proc in self.started.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.close()


def ask(port: int, password: str | None, *command: str) -> Any:
    """One command to the redis-server or Sentinel on `port`; None when it does not answer."""
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=1,
        socket_connect_timeout=1,
        decode_responses=True,
    )
    try:
        return client.execute_command(*command)
    except redis.RedisError:
        return None
    finally:
        client.close()


def replication(port: int, password: str | None) -> dict[str, str]:
    """INFO replication of the redis-server on `port` (redis-py parses it), values as strings."""
    reply = ask(port, password, "INFO", "replication")
    return {key: str(value) for key, value in reply.items()} if isinstance(reply, dict) else {}


def sentinel_master(port: int, password: str | None) -> dict[str, str]:
    reply = ask(port, password, "SENTINEL", "MASTER", MASTER)
    return dict(zip(reply[::2], reply[1::2], strict=True)) if isinstance(reply, list) else {}


def named_primaries(sentinel_ports: list[int], password: str | None) -> set[tuple[str, int] | None]:
    """What each Sentinel answers to GET-MASTER-ADDR-BY-NAME (one element when they agree)."""
    named: set[tuple[str, int] | None] = set()
    for port in sentinel_ports:
        reply = ask(port, password, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        named.add((reply[0], int(reply[1])) if isinstance(reply, list) and len(reply) == 2 else None)
    return named


def settled(sentinel_ports: list[int], password: str | None, replicas: int) -> bool:
    """Every Sentinel knows the others and `replicas` replicas it could promote (connected, their link
    to the primary up), and no failover is under way."""
    for port in sentinel_ports:
        master = sentinel_master(port, password)
        if master.get("flags") != "master" or master.get("num-other-sentinels") != str(len(sentinel_ports) - 1):
            return False
        reply = ask(port, password, "SENTINEL", "REPLICAS", MASTER)
        known = [dict(zip(r[::2], r[1::2], strict=True)) for r in reply] if isinstance(reply, list) else []
        if sum(r.get("flags") == "slave" and r.get("master-link-status") == "ok" for r in known) != replicas:
            return False
    return True


@needs_redis
def test_compose_ha_profile_fails_over_on_local_redis(tmp_path: Path, processes: Processes) -> None:
    """The `ha` profile's own commands, run as they are but on free ports of 127.0.0.1, with a
    shorter down-after-milliseconds: the Sentinels agree on `redis`, and promote `redis-replica`
    when `redis` is killed."""
    services = compose()["services"]
    host = local_host()
    names = ("redis", "redis-replica", *SENTINEL_SERVICES)
    ports = {name: free_port() for name in names}
    for name in names:
        workdir = tmp_path / name
        workdir.mkdir()
        command = [compose_value(word) for word in services[name]["command"]]
        assert command[:2] == ["sh", "-c"], name
        script, args = command[2], command[3:]
        script = script.replace("/data/", f"{workdir}/")  # the volume
        if name == "redis-replica":
            script = substitute(script, r"replicaof redis 6379", f"replicaof {host} {ports['redis']}")
        if name.startswith("sentinel-"):
            script = faster(substitute(script, r"monitor (\S+) redis 6379", rf"monitor \g<1> {host} {ports['redis']}"))
        if "--replica-announce-ip" in args:
            args[args.index("--replica-announce-ip") + 1] = host
        args += ["--port", str(ports[name]), *LOCAL_ARGS["redis-sentinel" if name in SENTINEL_SERVICES else "redis"]]
        processes.start(name, ["sh", "-c", script, *args], {"HOSTNAME": host}, workdir)
        processes.wait_until(f"{name} answering", partial(ask, ports[name], None, "PING"))

    sentinels = [ports[name] for name in SENTINEL_SERVICES]
    assert named_primaries(sentinels, None) == {(host, ports["redis"])}
    processes.wait_until(
        "a synced replica", lambda: replication(ports["redis-replica"], None).get("master_link_status") == "up"
    )
    processes.wait_until("Sentinels that know each other and the replica", lambda: settled(sentinels, None, 1))
    for name in SENTINEL_SERVICES:  # written by the command, then rewritten by Sentinel itself
        assert "sentinel myid" in (tmp_path / name / "sentinel.conf").read_text()

    processes.stop("redis", signal.SIGKILL)
    took = processes.wait_until(
        "promotion of redis-replica",
        lambda: (
            named_primaries(sentinels, None) == {(host, ports["redis-replica"])}
            and replication(ports["redis-replica"], None).get("role") == "master"
        ),
        timeout=FAILOVER_SECONDS,
    )
    assert took < FAILOVER_SECONDS
    # The promoted replica keeps its role over a restart: Sentinel wrote it to its config file.
    assert "replicaof" not in config_directives((tmp_path / "redis-replica" / "redis.conf").read_text())


class LocalPods:
    """The pods of deploy/k8s's `redis` and `redis-sentinel` StatefulSets as local processes: the
    manifests' commands, each volume a folder, the ConfigMap a copy of deploy/k8s/base/redis, the
    Secret's files random passwords, and every address one on `host` (each pod on a port of its own)."""

    def __init__(self, directory: Path, processes: Processes, host: str) -> None:
        self.directory = directory
        self.processes = processes
        self.host = host
        self.secret = {"redis-password": secrets.token_hex(16), "sentinel-password": secrets.token_hex(16)}
        self.pods = {pod.split(".")[0]: component for component in REDIS_COMPONENTS for pod in pod_names(component)}
        self.specs = {component: pod_spec(component) for component in REDIS_COMPONENTS}
        self.ports = {pod: free_port() for pod in self.pods}
        self.addresses = {
            "REDIS_NODES": " ".join(f"{host}:{self.ports[p]}" for p, c in self.pods.items() if c == "redis"),
            "SENTINELS": " ".join(f"{host}:{self.ports[p]}" for p, c in self.pods.items() if c == "redis-sentinel"),
            "ANNOUNCE_HOST": host,
        }
        for pod in self.pods:
            mounts = self.mounts(pod)
            for folder in mounts.values():
                folder.mkdir(parents=True, exist_ok=True)
            for file in REDIS_DIR.iterdir():
                text = file.read_text()
                if file.name == "redis.conf" and "/data" in mounts:  # a Redis server's pod
                    text = substitute(text, r"(?m)^dir /data$", f"dir {mounts['/data']}")
                if file.name == "sentinel.conf":
                    text = faster(text)
                (mounts["/config"] / file.name).write_text(text)
            # The Secret's files, each with the final newline an editor or `echo` leaves.
            spec = self.specs[self.pods[pod]]
            for container in [*spec["initContainers"], *spec["containers"]]:
                for path, (_, key) in secret_files(spec, container).items():
                    Path(self.command(pod, [path])[0]).write_text(self.secret[key] + "\n")

    def mounts(self, pod: str) -> dict[str, Path]:
        spec = self.specs[self.pods[pod]]
        return {
            mount["mountPath"]: self.directory / pod / mount["name"]
            for container in [*spec["initContainers"], *spec["containers"]]
            for mount in container["volumeMounts"]
        }

    def env(self, pod: str, container: dict[str, Any]) -> dict[str, str]:
        port = "REDIS_PORT" if self.pods[pod] == "redis" else "SENTINEL_PORT"
        env = {**os.environ, port: str(self.ports[pod])}
        for name, entry in env_of(container).items():
            if "value" in entry and name.endswith("_FILE"):
                env[name] = self.command(pod, [entry["value"]])[0]  # in the pod's folder for that volume
            elif "value" in entry:
                env[name] = self.addresses[name]  # every address the manifests set is replaced
            elif ref := entry["valueFrom"].get("secretKeyRef"):
                env[name] = self.secret[ref["key"]]
            else:
                env[name] = pod  # metadata.name
        return env

    def command(self, pod: str, words: list[str]) -> list[str]:
        """`words` with each mount path turned into the pod's folder for that volume."""
        mounts = self.mounts(pod)
        paths = re.compile("|".join(re.escape(path) + r"(?=/|$)" for path in sorted(mounts, key=len, reverse=True)))
        return [paths.sub(lambda m: str(mounts[m.group(0)]), word) for word in words]

    def containers(self, pod: str) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = self.specs[self.pods[pod]]
        (init,) = spec["initContainers"]
        (main,) = spec["containers"]
        return init, main

    def run(self, pod: str, words: list[str], container: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        env = self.env(pod, container)
        return subprocess.run(self.command(pod, words), env=env, capture_output=True, text=True, timeout=60)

    def start(self, pod: str) -> None:
        init, main = self.containers(pod)
        result = self.run(pod, init["command"], init)
        assert result.returncode == 0, f"{pod}'s init container: {result.stderr}"
        env = self.env(pod, main)
        args = [*self.command(pod, main["command"]), *LOCAL_ARGS[self.pods[pod]]]
        self.processes.start(pod, args, env, self.directory / pod)

    def hook(self, pod: str, kind: str) -> int:
        """Run a probe or the preStop hook of a Redis or Sentinel pod; its exit status."""
        _, main = self.containers(pod)
        action = main["lifecycle"]["preStop"] if kind == "preStop" else main[kind]
        return self.run(pod, action["exec"]["command"], main).returncode

    def ready(self, pod: str) -> bool:
        return self.hook(pod, "readinessProbe") == 0

    def config(self, pod: str) -> str:
        return (self.mounts(pod)["/etc/redis"] / "redis.conf").read_text()


@needs_redis
def test_k8s_redis_config_hands_over_and_fails_over_on_local_redis(tmp_path: Path, processes: Processes) -> None:
    """deploy/k8s's Redis pods, run locally (LocalPods): the first start makes redis-0 the primary;
    its preStop hook hands the role over; a killed primary is replaced within seconds; and a pod
    that starts again after all that follows the primary of now."""
    host = local_host()
    pods = LocalPods(tmp_path, processes, host)
    password, sentinel_password = pods.secret["redis-password"], pods.secret["sentinel-password"]
    servers = [pod for pod, component in pods.pods.items() if component == "redis"]
    sentinels = [pods.ports[pod] for pod, component in pods.pods.items() if component == "redis-sentinel"]
    first, *replicas = servers

    # OrderedReady: each Redis pod once the one before it is ready; then the Sentinels.
    for pod in servers:
        pods.start(pod)
        processes.wait_until(f"{pod} ready", partial(pods.ready, pod))
    assert "replicaof" not in config_directives(pods.config(first))
    for pod in replicas:
        assert config_directives(pods.config(pod))["replicaof"] == [f"{host} {pods.ports[first]}"]
    for port, pod in zip(sentinels, [p for p, c in pods.pods.items() if c == "redis-sentinel"], strict=True):
        pods.start(pod)
        processes.wait_until(f"{pod} answering", partial(ask, port, sentinel_password, "PING"))

    def named() -> set[tuple[str, int] | None]:
        return named_primaries(sentinels, sentinel_password)

    processes.wait_until("Sentinels naming redis-0", lambda: named() == {(host, pods.ports[first])})
    processes.wait_until("Sentinels that know all", partial(settled, sentinels, sentinel_password, len(replicas)))
    # Both the servers and the Sentinels require their password.
    for port in (pods.ports[first], sentinels[0]):
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping()
        assert ask(port, "wrong-password", "PING") is None
    # Every pod's liveness (and a Sentinel's readiness) probe, with the passwords from their files.
    for pod in pods.pods:
        assert pods.hook(pod, "livenessProbe") == 0, pod
        assert pods.ready(pod), pod

    # A rolling update stops redis-0: its preStop hook has a replica promoted first, one that has
    # every write redis-0 accepted, up to the last.
    writer = redis.Redis(host="127.0.0.1", port=pods.ports[first], password=password)
    writer.mset({f"key-{i}": i for i in range(10_000)})
    writer.close()
    assert pods.hook(first, "preStop") == 0
    assert named() != {(host, pods.ports[first])}  # the Sentinel that failed over names the new one
    processes.wait_until("Sentinels agreeing on a new primary", lambda: len(named()) == 1)
    (new_primary,) = named()
    assert new_primary is not None and new_primary[1] != pods.ports[first]
    assert replication(new_primary[1], password)["role"] == "master"
    assert ask(new_primary[1], password, "DBSIZE") == 10_000
    processes.stop(first, signal.SIGTERM)
    processes.wait_until("Sentinels agreeing on the new primary", lambda: named() == {new_primary})
    (lost,) = [pod for pod in replicas if pods.ports[pod] == new_primary[1]]
    (last,) = [pod for pod in replicas if pod != lost]

    def follows_new_primary() -> bool:
        return replication(pods.ports[last], password).get("master_port") == str(new_primary[1]) and pods.ready(last)

    processes.wait_until(f"{last} replicating from the new primary", follows_new_primary)
    processes.wait_until("the hand-over's end", partial(settled, sentinels, sentinel_password, 1))

    # The new primary's node is lost: the Sentinels promote the last replica.
    processes.stop(lost, signal.SIGKILL)
    assert pods.hook(lost, "livenessProbe") != 0  # gone: the kubelet would restart it

    def promoted() -> bool:
        return named() == {(host, pods.ports[last])} and replication(pods.ports[last], password).get("role") == "master"

    took = processes.wait_until(f"promotion of {last}", promoted, timeout=FAILOVER_SECONDS)
    assert took < FAILOVER_SECONDS

    # redis-0's pod starts again: its init container makes it a replica of the primary of now.
    init, _ = pods.containers(first)
    again = pods.run(first, init["command"], init)
    assert again.returncode == 0, again.stderr
    assert config_directives(pods.config(first))["replicaof"] == [f"{host} {pods.ports[last]}"]
