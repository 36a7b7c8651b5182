"""Secrets from files (`BUNCH_<NAME>_FILE`) and API keys one per file (`BUNCH_API_KEYS_DIR`), as
Kubernetes mounts a Secret: never through the environment."""

import subprocess
import sys
from pathlib import Path

import pytest

from deploy.processes import ROOT, base_env
from shared.errors import Misconfigured
from shared.secret_files import SECRET_SETTINGS, file_variable
from shared.settings import Settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.startswith("BUNCH_") or name.startswith("S3_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_secret_setting_is_read_from_its_file(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    for name in SECRET_SETTINGS:
        path = tmp_path / name
        path.write_text(f"value-of-{name}-0123456789\n")  # as `echo` or an editor leaves it
        clean_env.setenv(file_variable(name), str(path))
    settings = Settings(_env_file=None)
    for name in SECRET_SETTINGS:
        value = getattr(settings, name)
        plain = value if isinstance(value, str) else value.get_secret_value()
        assert plain == f"value-of-{name}-0123456789", name


def test_a_value_given_twice_is_refused(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret").write_text("from-the-file")
    clean_env.setenv("BUNCH_WEBHOOK_SECRET_FILE", str(tmp_path / "secret"))
    clean_env.setenv("BUNCH_WEBHOOK_SECRET", "from-the-environment")
    with pytest.raises(Misconfigured, match="BUNCH_WEBHOOK_SECRET and BUNCH_WEBHOOK_SECRET_FILE are both set"):
        Settings(_env_file=None)


def test_a_missing_file_is_named(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BUNCH_RUNPOD_API_KEY_FILE", str(tmp_path / "nowhere"))
    with pytest.raises(Misconfigured, match="BUNCH_RUNPOD_API_KEY_FILE: cannot read"):
        Settings(_env_file=None)


def test_api_keys_one_per_file_beside_the_variable(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "api-keys"
    # What the kubelet writes for a Secret volume: the entries as links into a timestamped folder.
    data = keys / "..2026_12_02_10_00_00.123"
    data.mkdir(parents=True)
    (data / "tenant-a").write_text("key-a-0123456789abcdefghij:alpha\n")
    (data / "tenant-b").write_text("key-b-0123456789abcdefghij:beta")
    (keys / "..data").symlink_to(data.name)
    for entry in ("tenant-a", "tenant-b"):
        (keys / entry).symlink_to(f"..data/{entry}")
    clean_env.setenv("BUNCH_API_KEYS_DIR", str(keys))
    clean_env.setenv("BUNCH_API_KEYS", "key-c-0123456789abcdefghij:gamma")
    assert Settings(_env_file=None).project_for_key() == {
        "key-c-0123456789abcdefghij": "gamma",
        "key-a-0123456789abcdefghij": "alpha",
        "key-b-0123456789abcdefghij": "beta",
    }


def test_a_service_starts_on_secrets_from_files(tmp_path: Path, settings: Settings) -> None:
    """The whole path a pod takes: the Redis URL (with its password, if any) only in a file."""
    (tmp_path / "redis-url").write_text(settings.redis_url + "\n")
    env = base_env({"BUNCH_REDIS_URL_FILE": str(tmp_path / "redis-url")})
    env.pop("REDIS_URL", None)
    probe = subprocess.run(
        [sys.executable, "-m", "shared.probe"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    (tmp_path / "redis-url").write_text("redis://127.0.0.1:1/0")
    probe = subprocess.run(
        [sys.executable, "-m", "shared.probe"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 1 and "127.0.0.1:1" in probe.stderr
