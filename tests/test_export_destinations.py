"""BUNCH_EXPORT_DESTINATIONS: what an operator writes, what a mistake in it says, and that a service
with a destination it cannot use does not start."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import Misconfigured
from shared.export_destinations import parse_destinations
from shared.settings import Settings

GOOD = {
    "endpoint": "https://storage.googleapis.com/",
    "bucket": "team-a-datasets",
    "prefix": "/bunch/exports/",
    "region": "auto",
    "access_key_id_env": "TEAM_A_KEY",
    "secret_access_key_file": "",
}


def config(**changes: object) -> str:
    return json.dumps({"team-a": {"archive": {**GOOD, **changes}}})


def test_destinations_are_read_with_their_credentials(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    parsed = parse_destinations(config(secret_access_key_file=str(tmp_path / "secret")), {"TEAM_A_KEY": "key-id"})
    archive = parsed["team-a"]["archive"]
    assert archive.endpoint == "https://storage.googleapis.com" and archive.prefix == "bunch/exports"
    assert archive.access_key_id.get_secret_value() == "key-id"
    assert archive.secret_access_key.get_secret_value() == "s3cret"  # the newline is no part of it
    assert archive.key("cats/1.png") == "bunch/exports/cats/1.png"
    assert "s3cret" not in repr(archive) and "key-id" not in repr(archive)
    assert parse_destinations("", {}) == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"secret_access_key_file": None}, "exactly one of secret_access_key_env and secret_access_key_file"),
        ({"access_key_id_file": "/x"}, "exactly one of access_key_id_env and access_key_id_file"),
        ({"access_key_id_env": "UNSET_VARIABLE"}, "UNSET_VARIABLE (access_key_id_env) is not set"),
        ({"secret_access_key_file": "/no/such/file"}, "cannot read secret_access_key_file /no/such/file"),
        ({"endpoint": "https://s3.example.com/bucket"}, "endpoint: Value error, expected a scheme and host"),
        ({"endpoint": "s3.example.com"}, "endpoint"),
        ({"bucket": "Not_A_Bucket"}, "bucket: Value error, not a valid S3 bucket name"),
        ({"prefix": "a/../b"}, "prefix"),
        ({"acl": "public-read"}, "acl: Extra inputs are not permitted"),
    ],
)
def test_a_mistake_is_named(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    (tmp_path / "secret").write_text("s3cret")
    values = {"secret_access_key_file": str(tmp_path / "secret"), **changes}
    with pytest.raises(Misconfigured, match="BUNCH_EXPORT_DESTINATIONS\\['team-a'\\]\\['archive'\\]") as caught:
        parse_destinations(config(**{k: v for k, v in values.items()}), {"TEAM_A_KEY": "key-id"})
    assert message in str(caught.value)


def test_names_and_shape_are_checked() -> None:
    with pytest.raises(Misconfigured, match="not JSON"):
        parse_destinations("{team-a", {})
    with pytest.raises(Misconfigured, match="expected"):
        parse_destinations('{"team-a": ["archive"]}', {})
    with pytest.raises(Misconfigured, match="a name is letters"):
        parse_destinations(json.dumps({"team-a": {"../archive": GOOD}}), {})


def test_settings_read_the_file_or_the_variable_never_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEAM_A_KEY", "key-id")
    monkeypatch.setenv("TEAM_A_SECRET", "s3cret")
    text = config(secret_access_key_env="TEAM_A_SECRET", secret_access_key_file=None)
    (tmp_path / "destinations.json").write_text(text)
    from_file = Settings(_env_file=None, export_destinations_file=tmp_path / "destinations.json")
    assert list(from_file.export_destinations_of("team-a")) == ["archive"]
    assert from_file.export_destinations_of("team-b") == {}
    with pytest.raises(Misconfigured, match="both set"):
        Settings(_env_file=None, export_destinations=text, export_destinations_file=tmp_path / "destinations.json")


def test_a_service_with_a_destination_it_cannot_use_does_not_start(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "BUNCH_ENV": "development",
        "BUNCH_EXPORT_DESTINATIONS": config(secret_access_key_env="NOT_SET_ANYWHERE", secret_access_key_file=None),
        "TEAM_A_KEY": "key-id",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.packager"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert "NOT_SET_ANYWHERE (secret_access_key_env) is not set" in done.stderr
