"""docker-compose.yml, checked without a Docker engine."""

import importlib.util

from tests.deploy_files import (
    ROOT,
    compose,
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
