"""`make dev` (python -m deploy.stack) serves a job end to end and stops cleanly on Ctrl-C."""

import os
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


def test_make_dev_takes_the_callers_settings() -> None:
    """`BUNCH_API_KEYS=... BUNCH_MAX_CONCURRENCY=1 make dev` runs with those settings, not the stack's,
    and its banner names the projects of the caller's keys without printing the keys."""
    port = free_port()
    keys = {"k1-0123456789abcdefghij": "p1", "k2-0123456789abcdefghij": "p2"}
    env = base_env(
        {"BUNCH_API_KEYS": ",".join(f"{key}:{project}" for key, project in keys.items()), "BUNCH_MAX_CONCURRENCY": "1"}
    )
    proc = subprocess.Popen(
        ["make", "-s", "dev", f"DEV_ARGS=--port {port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # make and the stack under it stop together on the group's SIGINT
    )
    try:
        url = _read_until(proc, r"API\s+(http://\S+)").group(1)
        banner = _read_until(proc, r"Try:")
        assert "projects p1, p2" in banner.string
        assert not any(key in banner.string for key in keys)
        assert "BUNCH_MAX_CONCURRENCY=1" in banner.string
        for key in keys:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
                stats = api.get("/api/queue/stats")
                assert stats.status_code == 200, stats.text
                assert stats.json()["dispatcher"]["max_concurrency"] == 1
        refused = httpx.get(f"{url}/api/queue/stats", headers={"Authorization": "Bearer dev-key"}, timeout=30)
        assert refused.status_code == 401
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        # make waits for the stack to stop, then ends by the same signal.
        assert proc.wait(timeout=30) in (0, -signal.SIGINT)
