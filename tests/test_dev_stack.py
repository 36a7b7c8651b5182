"""`make dev` (python -m deploy.stack) serves a job end to end and stops cleanly on Ctrl-C."""

import re
import signal
import subprocess
import sys
import time

import httpx

from deploy.processes import ROOT, base_env, free_port
from tests.stack_helpers import png_bytes


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> re.Match[str]:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if match := re.search(pattern, seen):
            return match
    raise AssertionError(f"no {pattern!r} in:\n{seen}")


def test_dev_stack_serves_a_job_and_stops_on_interrupt() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.stack", "--port", str(port)],
        cwd=ROOT,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = _read_until(proc, r"API\s+(http://\S+)").group(1)
        key = _read_until(proc, r"API key\s+(\S+)").group(1)
        assert url == f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
            uploaded = api.post("/api/uploads", files=[("files", ("ref.png", png_bytes(seed=3), "image/png"))])
            assert uploaded.status_code == 201, uploaded.text
            ref = uploaded.json()["uploads"][0]["id"]
            job = api.post(
                "/api/jobs",
                json={"mode": "semi_auto", "prompts": ["dev"], "reference_ids": [ref], "images_per_prompt": 5},
            )
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            deadline = time.monotonic() + 60
            while (status := api.get(f"/api/jobs/{job_id}/status").json())["status"] != "completed":
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["progress"]["images_succeeded"] == 5
            assert api.get(f"/api/jobs/{job_id}/download").status_code == 302
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
