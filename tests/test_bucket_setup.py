"""The bucket's preparation: created when missing, and a lifecycle rule that aborts multipart uploads
left unfinished (a ZIP writer killed mid-upload), beside the operator's own rules."""

import subprocess
import sys

from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

from deploy.processes import ROOT, base_env
from shared.bucket_setup import prepare_bucket
from shared.settings import Settings
from shared.storage import UPLOAD_CLEANUP, Storage

OPERATOR_RULE = Rule(ENABLED, rule_filter=Filter(prefix="tmp/"), rule_id="operator-tmp", expiration=Expiration(days=7))


def _rules(storage: Storage) -> dict[str, Rule]:
    config = storage.client.get_bucket_lifecycle(storage.bucket)
    return {str(rule.rule_id): rule for rule in (config.rules if config else [])}


async def test_the_rule_is_added_beside_the_operators_and_only_once(settings: Settings) -> None:
    storage = Storage(settings.model_copy(update={"s3_bucket": "lifecycle-kept"}))
    await storage.ensure_bucket()
    storage.client.set_bucket_lifecycle(storage.bucket, LifecycleConfig([OPERATOR_RULE]))
    for _ in range(2):
        await prepare_bucket(storage)
        rules = _rules(storage)
        assert set(rules) == {"operator-tmp", str(UPLOAD_CLEANUP.rule_id)}
    cleanup = rules[str(UPLOAD_CLEANUP.rule_id)].abort_incomplete_multipart_upload
    assert cleanup is not None and cleanup.days_after_initiation == 1
    assert rules["operator-tmp"].expiration == OPERATOR_RULE.expiration


def test_the_one_shot_command_creates_the_bucket_with_the_rule(settings: Settings) -> None:
    env = base_env(
        {
            "BUNCH_S3_ENDPOINT": settings.s3_endpoint,
            "BUNCH_S3_BUCKET": "made-by-setup",
            "BUNCH_S3_ACCESS_KEY": settings.s3_access_key.get_secret_value(),
            "BUNCH_S3_SECRET_KEY": settings.s3_secret_key.get_secret_value(),
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "shared.bucket_setup"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "bucket made-by-setup is ready" in done.stdout
    storage = Storage(settings.model_copy(update={"s3_bucket": "made-by-setup"}))
    assert storage.client.bucket_exists("made-by-setup")
    assert UPLOAD_CLEANUP.rule_id in _rules(storage)


def test_a_refusal_ends_the_command_with_its_reason(settings: Settings) -> None:
    # An invalid bucket name is refused by the store at once: no retrying, the reason is printed.
    env = base_env({"BUNCH_S3_ENDPOINT": settings.s3_endpoint, "BUNCH_S3_BUCKET": "Not_A_Bucket"})
    done = subprocess.run(
        [sys.executable, "-m", "shared.bucket_setup"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "bucket setup failed" in done.stderr
