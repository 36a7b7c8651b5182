"""docker-compose.yml, deploy/compose/local.env and the Dockerfiles, checked without a Docker engine
(deploy/checks/images.sh adds the Compose schema, hadolint and checkov)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from deploy.emulators.runpod.cli import parse_args as parse_runpod_args
from shared.secret_files import SECRET_SETTINGS
from shared.secret_policy import PUBLISHED
from shared.settings import Settings
from tests.deploy_files import ROOT, compose, settings_env_names

COMPOSE_FILE = ROOT / "docker-compose.yml"
LOCAL_ENV = ROOT / "deploy" / "compose" / "local.env"
BUNCH_IMAGE = "bunch:latest"
BUNCH_SERVICES = ("gateway", "dispatcher", "packager")
LOCAL_SERVICES = ("gemini-emulator", "runpod-emulator")
BIND = "${BUNCH_BIND_ADDRESS:-127.0.0.1}:"
# `${NAME}`, `${NAME:-default}`, `${NAME:?message}` ...: the name, the operator, the rest.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
DIGEST_PIN = re.compile(r"^[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9._-]+@sha256:[0-9a-f]{64}$")


def setting_variables(field: str) -> set[str]:
    """The names a setting is read as: BUNCH_<NAME> and its aliases."""
    alias = Settings.model_fields[field].validation_alias
    return {f"BUNCH_{field.upper()}", *(str(choice) for choice in getattr(alias, "choices", ()))}


# The variables whose value is a secret: the secret settings by every name, and the worker's key.
SECRET_VARIABLES = {name for field in SECRET_SETTINGS for name in setting_variables(field)} | {"GEMINI_API_KEY"}
# Required secrets: compose must stop without them (the others are optional, empty means off).
REQUIRED_SECRETS = {
    "BUNCH_S3_ACCESS_KEY",
    "BUNCH_S3_SECRET_KEY",
    "BUNCH_API_KEYS",
    "BUNCH_WEBHOOK_SECRET",
    "BUNCH_RUNPOD_API_KEY",
}
# What only RunPod (or its emulator, via local.env) can provide: no default outside the local profile.
RUNPOD_SETTINGS = ("BUNCH_RUNPOD_API_KEY", "BUNCH_RUNPOD_ENDPOINT_ID", "BUNCH_PUBLIC_URL", "BUNCH_S3_WORKER_ENDPOINT")


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def bunch_services() -> dict[str, Any]:
    """The services running Bunch's own image: the three services and the one-shot bucket setup."""
    return {name: s for name, s in services().items() if s.get("image") == BUNCH_IMAGE}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, so tests and reviewers can read it"
    return {key: str(value) for key, value in env.items()}


def interpolation(value: str) -> tuple[str, str, str]:
    """The one `${...}` a value consists of: (name, operator, default or message)."""
    match = INTERPOLATION.fullmatch(value)
    assert match, f"not a single ${{...}}: {value!r}"
    return match[1], match[2] or "", match[3] or ""


def local_env() -> dict[str, str]:
    values = {}
    for line in LOCAL_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def dockerfiles() -> list[Path]:
    """Every Dockerfile of the repository (as deploy/checks/images.sh finds them), hidden folders aside."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name != "node_modules"]
        found += [Path(folder) / name for name in files if name == "Dockerfile" or name.endswith(".Dockerfile")]
    assert len(found) == 3, found  # Bunch's, the emulators', the worker's
    return sorted(found)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


# --- what the services run and read -----------------------------------------------------------


def test_compose_commands_name_real_modules() -> None:
    for name, service in services().items():
        command = service.get("command")
        if isinstance(command, list) and command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, (name, command)
            if "--handler" in command:
                assert (ROOT / command[command.index("--handler") + 1]).is_file()


def test_compose_sets_only_settings_the_code_reads() -> None:
    known = settings_env_names()
    assert set(bunch_services()) == {*BUNCH_SERVICES, "s3-setup"}
    for name, service in bunch_services().items():
        unknown = [key for key in environment(service) if key not in known]
        assert not unknown, (name, unknown)


def test_compose_redis_keeps_an_append_only_file() -> None:
    redis = services()["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]


def test_every_long_running_service_has_a_healthcheck_and_restart_policy() -> None:
    for name in ("redis", "s3", *BUNCH_SERVICES, *LOCAL_SERVICES):
        service = services()[name]
        assert "healthcheck" in service and not service["healthcheck"].get("disable"), name
        assert service.get("restart") == "unless-stopped", name


def test_the_services_wait_for_redis_and_the_bucket() -> None:
    setup = services()["s3-setup"]
    assert setup["command"] == ["python", "-m", "shared.bucket_setup"]
    assert setup["restart"] == "no"
    assert setup["depends_on"] == {"s3": {"condition": "service_healthy"}}
    for name in BUNCH_SERVICES:
        assert services()[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "s3-setup": {"condition": "service_completed_successfully"},
        }, name


def test_dispatcher_and_packager_are_checked_by_one_request_to_their_metrics_port() -> None:
    for name in ("dispatcher", "packager"):
        service = services()[name]
        port = environment(service)["BUNCH_METRICS_PORT"]
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], (name, test)  # no shell, no `python -m shared.probe`
        assert f"urlopen('http://127.0.0.1:{port}/livez', timeout=3)" in test[3], (name, test)


def test_packager_outlasts_its_shutdown_grace() -> None:
    """Docker's SIGKILL comes after the packager's own grace, so a ZIP is abandoned cleanly."""
    packager = services()["packager"]
    configured = environment(packager).get("BUNCH_PACKAGER_SHUTDOWN_GRACE_SECONDS")
    grace = float(configured) if configured else Settings.model_fields["packager_shutdown_grace_seconds"].default
    assert seconds(packager["stop_grace_period"]) >= grace + 10
    assert seconds(services()["gateway"]["stop_grace_period"]) >= 20


# --- secrets and ports --------------------------------------------------------------------------


def test_secrets_have_no_default() -> None:
    """A secret is required (`:?`) or optional and empty by default, in every service and local.env."""
    for name, service in services().items():
        for key, value in environment(service).items():
            if key in SECRET_VARIABLES | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}:
                _, operator, default = interpolation(value)
                if key in REQUIRED_SECRETS or key.startswith("AWS_"):
                    assert operator == ":?", (name, key, value)
                elif operator in (":-", "-"):
                    # BUNCH_REDIS_URL's default names a server, not a password.
                    assert not default or "@" not in default, (name, key, value)
    for name, value in local_env().items():
        if name in SECRET_VARIABLES:
            assert interpolation(value)[:2] == (name, ":?"), f"local.env sets {name}"


def test_no_published_secret_anywhere() -> None:
    """No known value (minioadmin, change-me, dev-key, emulator-key, ...) in an environment, a
    command, a default or local.env."""
    values: list[str] = []
    for service in services().values():
        values += environment(service).values()
        values += service.get("command") or []
    values += local_env().values()
    texts = [COMPOSE_FILE.read_text(), LOCAL_ENV.read_text()]
    values += [match[3] for text in texts for match in INTERPOLATION.finditer(text) if match[2] in (":-", "-")]
    words = {word.lower() for value in values for word in re.split(r"[\s,:=]+", str(value)) if word}
    assert not words & PUBLISHED, words & PUBLISHED


def test_published_ports_listen_on_the_loopback_unless_asked() -> None:
    published = 0
    for name, service in services().items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith(BIND), (name, port)
            published += 1
    assert published == 2  # the gateway and the S3 server


# --- RunPod and the local profile -------------------------------------------------------------


def test_runpod_settings_are_required_outside_the_local_profile() -> None:
    """Without local.env, compose stops until .env names a real RunPod endpoint and the addresses
    RunPod's workers reach; nothing points at an emulator."""
    for name, service in bunch_services().items():
        env = environment(service)
        for key in RUNPOD_SETTINGS:
            assert interpolation(env[key])[1] == ":?", (name, key, env[key])
        _, _, base_url = interpolation(env["BUNCH_RUNPOD_BASE_URL"])
        assert base_url == Settings.model_fields["runpod_base_url"].default
        assert not [value for value in env.values() if "emulator" in value], name
    for name in LOCAL_SERVICES:
        assert services()[name]["profiles"] == ["local"], name


def test_local_env_runs_the_emulators_and_points_runpods_settings_at_them() -> None:
    local = local_env()
    env = environment(services()["gateway"])
    assert "local" in local["COMPOSE_PROFILES"].split(",")
    # Every name local.env sets is read by compose: unknown names would be silently ignored.
    compose_variables = {match[1] for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text())}
    assert set(local) - {"COMPOSE_PROFILES"} <= compose_variables

    runpod = services()["runpod-emulator"]["command"]
    base = urlsplit(local["BUNCH_RUNPOD_BASE_URL"])
    assert (base.hostname, str(base.port), base.path) == ("runpod-emulator", runpod[runpod.index("--port") + 1], "/v2")
    assert env["BUNCH_RUNPOD_BASE_URL"].startswith("${BUNCH_RUNPOD_BASE_URL:")
    # The emulator's key and endpoint are the services' own variables: one secret, in .env.
    assert interpolation(runpod[runpod.index("--api-key") + 1])[0] == interpolation(env["BUNCH_RUNPOD_API_KEY"])[0]
    assert interpolation(runpod[runpod.index("--endpoint-id") + 1])[0] == "RUNPOD_ENDPOINT_ID"
    assert interpolation(env["BUNCH_RUNPOD_ENDPOINT_ID"])[0] == "RUNPOD_ENDPOINT_ID"
    assert local["RUNPOD_ENDPOINT_ID"]
    assert "RUNPOD_API_KEY" not in local

    # The worker processes run in the RunPod emulator's container: they reach the gateway and the
    # S3 server by service name, and their links are signed for that name.
    gateway = services()["gateway"]["command"]
    public = urlsplit(local["BUNCH_PUBLIC_URL"])
    assert (public.hostname, str(public.port)) == ("gateway", gateway[gateway.index("--port") + 1])
    assert interpolation(env["BUNCH_PUBLIC_URL"])[0] == "BUNCH_PUBLIC_URL"
    assert local["BUNCH_S3_WORKER_ENDPOINT"] == env["BUNCH_S3_ENDPOINT"] == "http://s3:9000"
    assert interpolation(env["BUNCH_S3_WORKER_ENDPOINT"])[0] == "BUNCH_S3_WORKER_ENDPOINT"
    assert "-s3.port=9000" in services()["s3"]["command"]
    # People's links stay on the published port.
    assert "BUNCH_S3_PUBLIC_ENDPOINT" not in local
    assert interpolation(env["BUNCH_S3_PUBLIC_ENDPOINT"])[2] == "http://localhost:9000"
    assert f"{BIND}9000:9000" in services()["s3"]["ports"]


def test_the_emulators_accept_their_compose_commands() -> None:
    """The flags compose passes exist: the RunPod emulator's own parser, the Gemini emulator's --help."""

    def filled(command: list[str]) -> list[str]:
        return [INTERPOLATION.sub("x" * 24, arg) for arg in command[3:]]

    runpod = parse_runpod_args(filled(services()["runpod-emulator"]["command"]))
    assert (runpod.workers, runpod.handler, runpod.endpoint_id) == (2, "worker/handler.py", "x" * 24)
    gemini = services()["gemini-emulator"]["command"]
    usage = subprocess.run([sys.executable, *gemini[1:3], "--help"], capture_output=True, text=True, check=True)
    for flag in (arg for arg in gemini[3:] if arg.startswith("--")):
        assert flag in usage.stdout, flag


def test_the_gemini_emulator_and_the_worker_share_one_required_key() -> None:
    gemini = services()["gemini-emulator"]["command"]
    worker_env = environment(services()["runpod-emulator"])
    assert interpolation(gemini[gemini.index("--api-key") + 1])[0] == "GEMINI_API_KEY"
    assert interpolation(worker_env["GEMINI_API_KEY"])[0] == "GEMINI_API_KEY"
    # Compose fills in every service whatever the profile: local.env, read only with the profile,
    # is where the key is required.
    assert interpolation(local_env()["GEMINI_API_KEY"])[:2] == ("GEMINI_API_KEY", ":?")
    base = urlsplit(worker_env["GEMINI_BASE_URL"])
    assert (base.hostname, str(base.port)) == ("gemini-emulator", gemini[gemini.index("--port") + 1])


def test_the_s3_server_takes_bunchs_keys() -> None:
    s3 = environment(services()["s3"])
    env = environment(services()["gateway"])
    assert interpolation(s3["AWS_ACCESS_KEY_ID"])[0] == interpolation(env["BUNCH_S3_ACCESS_KEY"])[0]
    assert interpolation(s3["AWS_SECRET_ACCESS_KEY"])[0] == interpolation(env["BUNCH_S3_SECRET_KEY"])[0]


# --- images ---------------------------------------------------------------------------------------


def test_every_image_is_pinned_by_digest() -> None:
    """Pulled images by `name:tag@sha256:<64 hex>`; the ones built here by a local name; every FROM
    by digest (or an earlier stage)."""
    for name, service in services().items():
        image = service["image"]
        if "build" in service:
            assert re.fullmatch(r"bunch(-[a-z]+)?:latest", image), (name, image)
        else:
            assert DIGEST_PIN.match(image), (name, image)
    for dockerfile in dockerfiles():
        stages: set[str] = set()
        froms = [args.split() for keyword, args in instructions(dockerfile) if keyword == "FROM"]
        assert froms, dockerfile
        for words in froms:
            assert words[0] in stages or DIGEST_PIN.match(words[0]), (dockerfile, words)
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])


def test_dockerfiles_exist_and_copy_what_they_run() -> None:
    for name, service in services().items():
        build = service.get("build")
        if not build:
            continue
        sources = " ".join(a for k, a in instructions(ROOT / build["dockerfile"]) if k == "COPY")
        command = service["command"]
        assert command[:2] == ["python", "-m"], name
        package = command[2].split(".")[0]
        assert re.search(rf"(^|\s){package}(/|\s)", sources), (name, package, sources)
        if "--handler" in command:
            assert Path(command[command.index("--handler") + 1]).parts[0] in sources, name
    worker = (ROOT / "worker" / "Dockerfile").read_text()
    assert "handler.py" in worker and "requirements.txt" in worker


def test_images_install_their_lock_before_their_source() -> None:
    """The hashed lock is installed before any source is copied (a code edit reuses that layer),
    each image its own lock."""
    locks = {
        "Dockerfile": "requirements/service.txt",
        "emulator.Dockerfile": "requirements/emulators.txt",
        "worker/Dockerfile": "worker/requirements.txt",
    }
    for dockerfile in dockerfiles():
        key = "worker/Dockerfile" if dockerfile.parent.name == "worker" else dockerfile.name
        steps = instructions(dockerfile)
        copies = [i for i, (keyword, _) in enumerate(steps) if keyword == "COPY"]
        first_copy = steps[copies[0]][1]
        assert first_copy.startswith(locks[key] + " "), (dockerfile, first_copy)
        installs = [i for i, (k, args) in enumerate(steps) if k == "RUN" and "pip install" in args]
        assert len(installs) == 1 and copies[0] < installs[0] < copies[1], dockerfile
        assert "--require-hashes" in steps[installs[0]][1], dockerfile


def test_images_run_as_a_user_without_writing_bytecode_and_say_how_they_are_checked() -> None:
    for dockerfile in dockerfiles():
        steps = instructions(dockerfile)
        users = [args for keyword, args in steps if keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), dockerfile
        assert users[-1] == "10001:10001", dockerfile  # deploy/k8s runs the pods as 10001
        env = " ".join(args for keyword, args in steps if keyword == "ENV")
        assert "PYTHONDONTWRITEBYTECODE=1" in env, dockerfile
        checks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
        assert len(checks) == 1, dockerfile
        if checks[0] == "NONE":  # the worker alone: RunPod supervises it, and it serves no port
            assert dockerfile.parent.name == "worker", dockerfile


def test_the_build_context_leaves_out_secrets_and_keeps_what_the_images_copy() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored
    for dockerfile in dockerfiles():
        for keyword, args in instructions(dockerfile):
            if keyword == "COPY":
                for source in args.split()[:-1]:
                    top = source.split("/")[0]
                    assert top not in ignored and source not in ignored, (dockerfile, source)
                    assert list(ROOT.glob(source)), (dockerfile, source)


def test_compose_and_kubernetes_pin_the_same_redis() -> None:
    """One Redis release for both deployments: a digest moved in one place is moved in both."""
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/base/kustomization.yaml").read_text())
    [redis] = [image for image in kustomization["images"] if image["name"] == "redis"]
    pinned = f"redis:{redis['newTag']}@{redis['digest']}"
    assert compose()["x-redis"]["image"] == pinned
