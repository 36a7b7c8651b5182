"""One small real job against real RunPod and Gemini: `make smoke`.

Bunch's services run here (a local Redis; the emulators start too, unused) with your settings:
`BUNCH_RUNPOD_API_KEY` and `BUNCH_RUNPOD_ENDPOINT_ID` name the RunPod endpoint that runs the worker
image (`make worker-image`, with GEMINI_API_KEY set on the endpoint), and `BUNCH_S3_*` an object
store the RunPod workers can reach. Without them it says what is missing and exits 0 (skipped).
RunPod cannot call back to this machine, so runs are followed by polling /status
(`BUNCH_WEBHOOK_GRACE_SECONDS`, 5 s here unless you set it).
"""

import io
import os
import secrets
import shutil
import sys
import time
import zipfile

import httpx
from PIL import Image

from deploy.processes import ROOT, scratch_dir
from deploy.stack import caller_settings, start_stack

NEEDED = ("BUNCH_RUNPOD_API_KEY", "BUNCH_RUNPOD_ENDPOINT_ID", "BUNCH_S3_ENDPOINT", "BUNCH_S3_SECRET_KEY")
TIMEOUT_SECONDS = 900  # a cold RunPod worker pulls its image first


def reference_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 120, 40)).save(out, "PNG")
    return out.getvalue()


def run_smoke(settings: dict[str, str]) -> str:
    """Runs the job; returns a one-line summary, raises AssertionError on any failure."""
    workdir = scratch_dir("bunch-smoke-")
    env = {"BUNCH_WEBHOOK_GRACE_SECONDS": "5", "BUNCH_POLL_INTERVAL_SECONDS": "5", **settings}
    # The gateway here is the smoke test's own, for as long as it runs: a key of its own, whatever
    # keys (variable, file or folder) the settings name, which would stay unused anyway.
    for name in ("BUNCH_API_KEYS", "BUNCH_API_KEYS_FILE", "BUNCH_API_KEYS_DIR"):
        env.pop(name, None)
    api_key = secrets.token_urlsafe(24)
    env["BUNCH_API_KEYS"] = f"{api_key}:smoke"
    stack = start_stack(workdir, runpod_workers=1, service_env=env)
    started = time.monotonic()
    try:
        headers = {"Authorization": f"Bearer {api_key}"}
        with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as api:
            uploaded = api.post("/api/uploads", files=[("files", ("ref.png", reference_png(), "image/png"))])
            assert uploaded.status_code == 201, uploaded.text
            body = {
                "mode": "semi_auto",
                "prompts": ["A small orange square on a plain background, studio photo"],
                "reference_ids": [uploaded.json()["uploads"][0]["id"]],
                "images_per_prompt": 1,
            }
            job = api.post("/api/jobs", json=body)
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            while (status := api.get(f"/api/jobs/{job_id}/status").json())["status"] not in (
                "completed",
                "failed",
                "canceled",
            ):
                assert time.monotonic() - started < TIMEOUT_SECONDS, f"not done in {TIMEOUT_SECONDS}s: {status}"
                time.sleep(2)
            assert status["status"] == "completed", f"the job ended {status['status']}: {status}"
            link = api.get(f"/api/jobs/{job_id}/download")
            assert link.status_code == 302, link.text
            archive = httpx.get(link.headers["location"], timeout=120)
            assert archive.status_code == 200, f"the ZIP link answered {archive.status_code}"
            names = zipfile.ZipFile(io.BytesIO(archive.content)).namelist()
            images = [name for name in names if not name.endswith(".json")]
            assert len(images) == 1, names
        took = time.monotonic() - started
        return f"job {job_id} completed in {took:.0f}s: {images[0]}, a ZIP of {len(archive.content)} bytes"
    except AssertionError:
        print(stack.logs(), file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    settings = caller_settings(ROOT / ".env", os.environ)
    missing = [name for name in NEEDED if not settings.get(name) and not settings.get(f"{name}_FILE")]
    if missing:
        print(f"smoke skipped: set {', '.join(missing)} (in .env or the environment) to run one real job")
        return 0
    try:
        print(f"smoke passed: {run_smoke(settings)}")
    except AssertionError as exc:
        print(f"smoke failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
