"""Prometheus metrics of every service, and JSON logs that carry job and run ids, after a real job."""

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.processes import scratch_dir
from deploy.stack import Stack, start_stack
from tests.stack_helpers import client, submit, wait_final


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = scratch_dir("bunch-metrics-")
    stack = start_stack(workdir, api_keys="metrics-key:metrics")
    yield stack
    stack.stop()
    shutil.rmtree(workdir, ignore_errors=True)


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with httpx.AsyncClient() as plain:
        response = await plain.get(url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_every_service_reports_what_a_job_did(stack: Stack) -> None:
    api = client(stack, "metrics-key")
    job = await submit(api, {"mode": "semi_auto", "prompts": ["fine", "[emu:safety] no"], "images_per_prompt": 3})
    status = await wait_final(api, job, stack)
    assert status["status"] == "completed"

    gateway = await scrape(stack.metrics_url("gateway-0"))
    assert value(gateway, "bunch_jobs", status="completed") >= 1
    assert value(gateway, "bunch_runs_in_flight") == 0
    assert value(gateway, "bunch_http_requests_total", method="POST", route="/api/jobs", status="202") == 1
    assert value(gateway, "bunch_http_request_seconds_count", route="/api/jobs/{job_id}/status") >= 1
    assert value(gateway, "bunch_stream_lag", stream="bunch:packaging", group="packager") == 0

    dispatcher = await scrape(stack.metrics_url("dispatcher-0"))
    assert value(dispatcher, "bunch_runs_started_total") == 2
    assert value(dispatcher, "bunch_dispatch_latency_seconds_count") == 2
    assert value(dispatcher, "bunch_images_total", status="succeeded") == 3
    assert value(dispatcher, "bunch_gemini_errors_total", kind="safety_blocked") == 3
    assert value(dispatcher, "bunch_stream_pending", stream="bunch:task-results", group="dispatcher") == 0

    packager = await scrape(stack.metrics_url("packager-0"))
    assert value(packager, "bunch_packaging_bytes_total") == status["zip"]["bytes"]
    assert value(packager, "bunch_packaging_seconds_count") == 1


async def test_logs_are_json_lines_with_job_and_run_ids(stack: Stack) -> None:
    api = client(stack, "metrics-key")
    async with httpx.AsyncClient(base_url=stack.runpod_url) as runpod:
        (await runpod.post("/_emulator/faults", json={"fail_next_runs": 1})).raise_for_status()
    job = await submit(api, {"mode": "semi_auto", "prompts": ["retried"], "images_per_prompt": 1})
    assert (await wait_final(api, job, stack))["status"] == "completed"
    lines = stack.processes["dispatcher-0"].log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in entries)
    # Per-run lines are debug; what needs a look (a failed attempt, retried) names the job and run.
    retried = [e for e in entries if e["level"] == "warning" and "retrying" in e["msg"]]
    assert [(e["job_id"], e["run_id"]) for e in retried] == [(job, f"{job}.0")]
    assert not [e for e in entries if "started as" in e["msg"]]  # BUNCH_LOG_LEVEL=INFO by default
