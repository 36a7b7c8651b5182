"""`make smoke`: skipped, saying why, without RunPod settings; with them, one real job end to end.
Here "real" is the emulators, reached by configuration alone, as the real services would be."""

import subprocess
import sys
from pathlib import Path

from deploy.processes import ROOT, base_env
from deploy.stack import EMULATOR_KEY
from tests.stack_helpers import running_stack


def test_without_settings_it_says_what_is_missing_and_passes() -> None:
    done = subprocess.run(
        ["make", "-s", "smoke"], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "smoke skipped: set BUNCH_RUNPOD_API_KEY, BUNCH_RUNPOD_ENDPOINT_ID" in done.stdout


def test_with_settings_it_runs_one_job_to_its_zip(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("callers-key-0123456789abcdef:theirs\n")
    with running_stack("bunch-smoke-upstream-", runpod_workers=1, services=()) as upstream:
        env = base_env(
            {
                "BUNCH_RUNPOD_BASE_URL": f"{upstream.runpod_url}/v2",
                "BUNCH_RUNPOD_API_KEY": EMULATOR_KEY,
                "BUNCH_RUNPOD_ENDPOINT_ID": "local",
                "BUNCH_S3_ENDPOINT": upstream.s3_url,
                "BUNCH_S3_ACCESS_KEY": "smoke-access-key",
                "BUNCH_S3_SECRET_KEY": "smoke-secret-key-0123456789",
                # The caller's keys, as a file: the smoke test uses a key of its own beside them.
                "BUNCH_API_KEYS_FILE": str(keys),
            }
        )
        done = subprocess.run(
            [sys.executable, "-m", "deploy.smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke passed: job" in done.stdout
