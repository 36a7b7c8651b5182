"""The `bunch` CLI against the real stack (gateway, dispatcher, packager, redis-server, S3, the
emulators), run as a subprocess the way a person or a script runs it."""

import io
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from minio import Minio
from PIL import Image

from bunch_cli import sse
from bunch_cli.client import BunchClient
from bunch_cli.errors import CliError, ExitCode
from bunch_cli.units import usd
from deploy.processes import ROOT, free_port
from deploy.stack import SERVICES, Stack
from tests.stack_helpers import QUICK_TIMERS, png_bytes, running_stack, stack_bucket

KEY = "cli-key"
QUOTE_KEY = "cli-quote-key"  # a project of its own, whose job list the dry runs must leave empty
POOR_KEY = "cli-poor-key"  # a project whose budget no job fits
KEYS_KEY = "cli-keys-key"  # a project whose job count the tests of idempotent submits look at
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# Project cli's export destination: a bucket of its own on the stack's S3 server, reached with the
# stack's credentials (Settings' defaults; moto takes any), named by environment variables.
EXPORT_BUCKET = "cli-exports"
EXPORT_CREDENTIALS = {"CLI_EXPORT_KEY_ID": "minioadmin", "CLI_EXPORT_SECRET": "minioadmin"}


def export_destinations(s3_url: str) -> str:
    archive = {
        "endpoint": s3_url,
        "bucket": EXPORT_BUCKET,
        "prefix": "/bunch-out/",
        "access_key_id_env": "CLI_EXPORT_KEY_ID",
        "secret_access_key_env": "CLI_EXPORT_SECRET",
    }
    return json.dumps({"cli": {"archive": archive}})


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-cli-",
        api_keys=f"{KEY}:cli,{QUOTE_KEY}:cli-quotes,{POOR_KEY}:cli-poor,{KEYS_KEY}:cli-keys",
        runpod_workers=8,
        runpod_args=("--webhook-retry-delay", "0.2"),
        service_env={
            "BUNCH_MAX_CONCURRENCY": "5",
            **QUICK_TIMERS,
            "BUNCH_PROJECT_BUDGETS": "cli-poor:0.0001/day",
            **EXPORT_CREDENTIALS,
        },
        services=(),
    ) as stack:
        # The destination's endpoint is the stack's S3 server, whose port is known once it runs:
        # the services start after it is in their settings.
        stack.service_env["BUNCH_EXPORT_DESTINATIONS"] = export_destinations(stack.s3_url)
        for name in SERVICES:
            stack.start_service(name)
        yield stack


def cli_env(url: str, api_key: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUNCH_")}
    env["BUNCH_URL"] = url
    if api_key is not None:
        env["BUNCH_API_KEY"] = api_key
    return env


def bunch(url: str, *args: str, api_key: str | None = KEY, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bunch_cli.main", *args],
        env=cli_env(url, api_key),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def images_in(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        names = sorted(name for name in archive.namelist() if name.endswith(".png"))
        for name in names:
            Image.open(io.BytesIO(archive.read(name))).verify()
        assert "manifest.json" in archive.namelist()
    return names


def route_exists(stack: Stack, method: str, path: str) -> bool:
    """Whether the running gateway has the route (an unknown route is a plain 404/405)."""
    response = httpx.request(method, stack.gateway_url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    return not (
        response.status_code in (404, 405) and response.json().get("detail") in ("Not Found", "Method Not Allowed")
    )


def test_a_whole_job_from_submit_wait_to_download(stack: Stack, tmp_path: Path) -> None:
    refs = []
    for seed in (1, 2):
        ref = tmp_path / f"ref{seed}.png"
        ref.write_bytes(png_bytes(seed=seed))
        refs += ["--ref", str(ref)]
    submitted = bunch(
        stack.gateway_url,
        "submit",
        "semi-auto",
        "--group",
        "cli-foxes",
        "--prompt",
        "a red fox in snow",
        "--prompt",
        "a lighthouse at dusk",
        *refs,
        "--images",
        "5",
        "--priority",
        "5",
        "--wait",
    )
    job_id = ok(submitted).strip()
    assert JOB_ID.match(job_id), submitted.stdout
    assert f"Job {job_id} completed: 10 of 10 images" in submitted.stderr, submitted.stderr

    status = ok(bunch(stack.gateway_url, "status", job_id))
    assert job_id in status and "completed" in status and "10 done, 0 failed, of 10" in status
    view = json.loads(ok(bunch(stack.gateway_url, "status", job_id, "--json")))
    assert view["status"] == "completed" and view["group"] == "cli-foxes" and view["priority"] == 5
    assert view["progress"]["images_succeeded"] == 10 and view["progress"]["runs_total"] == 4

    listing = ok(bunch(stack.gateway_url, "jobs"))
    row = next(line for line in listing.splitlines() if job_id in line)
    assert "completed" in row and "cli-foxes" in row and "10/10" in row
    listed = json.loads(ok(bunch(stack.gateway_url, "jobs", "--group", "cli-foxes", "--json")))
    assert [job["id"] for job in listed] == [job_id]

    target = tmp_path / "out.zip"
    downloaded = bunch(stack.gateway_url, "download", job_id, "-o", str(target))
    ok(downloaded)
    assert f"to {target}" in downloaded.stderr
    assert images_in(target) == [f"{index:05d}.png" for index in range(10)]
    assert not target.with_name("out.zip.part").exists()


def test_cancel_ends_a_waiting_submit_with_exit_1_then_retry_and_watch(stack: Stack, tmp_path: Path) -> None:
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bunch_cli.main",
            "submit",
            "semi-auto",
            "--prompt",
            "[emu:sleep=400] a slow fox",
            "--images",
            "120",
            "--wait",
        ],
        env=cli_env(stack.gateway_url, KEY),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stdout is not None
        job_id = waiting.stdout.readline().strip()
        assert JOB_ID.match(job_id), job_id
        canceled = ok(bunch(stack.gateway_url, "cancel", job_id))
        assert f"Job {job_id}: canceled" in canceled
        _, stderr = waiting.communicate(timeout=30)
    finally:
        waiting.kill()
    assert waiting.returncode == ExitCode.JOB_FAILED, stderr
    assert f"Job {job_id} canceled" in stderr

    again = bunch(stack.gateway_url, "cancel", job_id)
    assert again.returncode == ExitCode.NOT_FOUND and "(HTTP 409)" in again.stderr, again.stderr

    retried = bunch(stack.gateway_url, "retry", job_id)
    new_id = ok(retried).strip()
    assert JOB_ID.match(new_id), retried.stdout
    target = tmp_path / "early.zip"
    early = bunch(stack.gateway_url, "download", new_id, "-o", str(target))
    assert early.returncode == ExitCode.NOT_FOUND and "not ready" in early.stderr, early.stderr
    assert not target.exists() and not list(tmp_path.iterdir())
    watched = bunch(stack.gateway_url, "watch", new_id)
    ok(watched)
    assert f"Job {new_id} completed" in watched.stderr, watched.stderr
    assert json.loads(ok(bunch(stack.gateway_url, "status", new_id, "--json")))["status"] == "completed"

    nothing_left = bunch(stack.gateway_url, "watch")
    ok(nothing_left)
    assert "No jobs in progress" in nothing_left.stderr


def test_a_wrong_or_missing_key_exits_3_with_a_readable_message(stack: Stack) -> None:
    wrong = bunch(stack.gateway_url, "jobs", api_key="not-a-key")
    assert wrong.returncode == ExitCode.AUTH, wrong
    assert "Authentication failed (401): Unknown API key." in wrong.stderr and "BUNCH_API_KEY" in wrong.stderr
    assert "Traceback" not in wrong.stderr and wrong.stdout == ""
    missing = bunch(stack.gateway_url, "status", "0" * 32, api_key=None)
    assert missing.returncode == ExitCode.AUTH and "Missing API key" in missing.stderr, missing


def test_a_server_that_is_down_exits_5_with_a_readable_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (("jobs",), ("status", "0" * 32), ("submit", "semi-auto", "--prompt", "x", "--images", "1")):
        result = bunch(url, *args)
        assert result.returncode == ExitCode.SERVER, (args, result)
        assert f"Cannot reach the Bunch server at {url}" in result.stderr and "BUNCH_URL" in result.stderr
        assert "Traceback" not in result.stderr


def test_unknown_jobs_exit_4_and_bad_input_exits_2(stack: Stack, tmp_path: Path) -> None:
    unknown = bunch(stack.gateway_url, "status", "0" * 32)
    assert unknown.returncode == ExitCode.NOT_FOUND and "No such job in this project." in unknown.stderr

    missing_option = bunch(stack.gateway_url, "submit", "semi-auto", "--prompt", "x")
    assert missing_option.returncode == ExitCode.USAGE and "--images" in missing_option.stderr
    missing_file = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "x", "-n", "1", "--ref", "nope.png")
    assert missing_file.returncode == ExitCode.USAGE and "nope.png" in missing_file.stderr

    not_image = tmp_path / "notes.png"
    not_image.write_text("hello, not a png")
    refused = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "x", "-n", "1", "--ref", str(not_image))
    assert refused.returncode == ExitCode.USAGE, refused
    assert "notes.png: the file is not an image (HTTP 415)" in refused.stderr
    bad_param = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "x", "-n", "1", "--aspect-ratio", "7:3")
    assert bad_param.returncode == ExitCode.USAGE and "aspect_ratio" in bad_param.stderr, bad_param


def test_submit_auto_uploads_a_folder_or_a_zip_as_a_dataset(stack: Stack, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = bunch(stack.gateway_url, "submit", "auto", "-p", "x", str(empty))
    assert nothing.returncode == ExitCode.USAGE and "No images" in nothing.stderr, nothing

    archive = tmp_path / "inputs.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for index in range(3):
            out.writestr(f"in{index}.png", png_bytes(32, 32, seed=20 + index))
    from_zip = bunch(stack.gateway_url, "submit", "auto", "-p", "ink", str(archive))
    zip_job = ok(from_zip).strip()
    assert JOB_ID.match(zip_job) and "3 image(s) accepted, 0 rejected" in from_zip.stderr, from_zip.stderr

    folder = tmp_path / "dataset"
    (folder / "more").mkdir(parents=True)
    for index in range(4):
        (folder / f"img{index}.png").write_bytes(png_bytes(32, 32, seed=index))
    (folder / "more" / "deep.png").write_bytes(png_bytes(32, 32, seed=9))
    (folder / "broken.png").write_bytes(b"not an image at all")
    (folder / "README.txt").write_text("left out: not an image name")
    (folder / ".hidden.png").write_bytes(png_bytes(32, 32, seed=7))
    submitted = bunch(
        stack.gateway_url, "submit", "auto", "--group", "cli-dataset", "--prompt", "watercolor", str(folder),
        "--variations", "2",
    )  # fmt: skip
    job_id = ok(submitted).strip()
    assert JOB_ID.match(job_id), submitted.stdout
    assert "5 image(s) accepted, 1 rejected" in submitted.stderr and "broken.png" in submitted.stderr

    view = json.loads(ok(bunch(stack.gateway_url, "status", job_id, "--json")))
    assert view["progress"]["images_total"] == 10 and view["group"] == "cli-dataset"
    watched = bunch(stack.gateway_url, "watch", job_id, zip_job)
    ok(watched)
    assert f"Job {job_id} completed: 10 of 10 images" in watched.stderr, watched.stderr
    assert f"Job {zip_job} completed: 3 of 3 images" in watched.stderr, watched.stderr
    target = tmp_path / "dataset.zip"
    ok(bunch(stack.gateway_url, "download", job_id, "-o", str(target)))
    assert len(images_in(target)) == 10


def test_stats_shows_the_queue(stack: Stack) -> None:
    body = json.loads(ok(bunch(stack.gateway_url, "stats", "--json")))
    assert body["queue"]["total_jobs"] >= 1 and "max_concurrency" in body["dispatcher"]
    table = ok(bunch(stack.gateway_url, "stats"))
    assert table.strip()


def test_the_installed_entry_point_runs_from_anywhere(tmp_path: Path) -> None:
    entry = Path(sys.executable).with_name("bunch")
    assert entry.is_file(), "reinstall the project: pip install -e '.[dev]'"
    started = time.monotonic()
    result = subprocess.run([str(entry), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.startswith("bunch "), result
    assert time.monotonic() - started < 10


def test_event_stream_parsing() -> None:
    lines = [
        ": keep-alive",
        "id: 7",
        "event: progress",
        'data: {"status": "processing",',
        'data:  "runs_done": 2}',
        "",
        "retry: 1000",
        "",
        "data: last",
    ]
    events = list(sse.parse(lines))
    assert events == [
        sse.Event("progress", '{"status": "processing",\n "runs_done": 2}', "7"),
        sse.Event("message", "last", "7"),
    ]


def test_dry_run_prints_both_lanes_and_creates_no_job(stack: Stack, tmp_path: Path) -> None:
    api = httpx.Client(base_url=stack.gateway_url, headers={"Authorization": f"Bearer {QUOTE_KEY}"}, timeout=30)
    ref = tmp_path / "ref.png"
    ref.write_bytes(png_bytes(seed=41))
    args = ("submit", "semi-auto", "--prompt", "a paper crane", "--prompt", "a tin robot", "--ref", str(ref), "-n", "6")
    dry = bunch(stack.gateway_url, *args, "--dry-run", api_key=QUOTE_KEY)
    printed = ok(dry)
    assert "no job was created" in dry.stderr.lower()
    reference_id = api.post("/api/uploads", files=[("files", ("ref.png", ref.read_bytes()))]).json()["uploads"][0]["id"]
    body = {"mode": "semi_auto", "group": "default", "prompts": ["a paper crane", "a tin robot"],
            "reference_ids": [reference_id], "images_per_prompt": 6, "priority": 10, "lane": "realtime"}  # fmt: skip
    quote = api.post("/api/jobs/quote", json=body).json()
    realtime, batch = quote["lanes"]["realtime"], quote["lanes"]["batch"]
    assert quote["images"] == 12 and batch["total_usd"] < realtime["total_usd"]
    header = next(line for line in printed.splitlines() if "realtime" in line and "batch" in line)
    assert header.split() == ["realtime", "(chosen)", "batch"], printed
    total = next(line for line in printed.splitlines() if line.startswith("total USD"))
    assert total.split()[2:] == [usd(realtime["total_usd"]), usd(batch["total_usd"])], printed
    runs = next(line for line in printed.splitlines() if line.startswith("runs"))
    assert runs.split()[1:] == [str(realtime["runs"]), str(batch["runs"])], printed
    for label in ("prompt tokens", "output tokens", "Gemini USD", "RunPod worker-seconds", "RunPod USD",
                  "expected wait", "expected duration"):  # fmt: skip
        assert label in printed, (label, printed)
    assert "Budget" in printed or "No budget is set" in printed

    batch_dry = ok(bunch(stack.gateway_url, *args, "--lane", "batch", "--dry-run", api_key=QUOTE_KEY))
    assert "batch (chosen)" in batch_dry

    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        (folder / f"p{index}.png").write_bytes(png_bytes(32, 32, seed=50 + index))
    auto = ok(bunch(stack.gateway_url, "submit", "auto", "-p", "ink", str(folder), "-v", "2", "--dry-run",
                    api_key=QUOTE_KEY))  # fmt: skip
    assert auto.startswith("6 image(s) with ") and "total USD" in auto, auto
    assert api.get("/api/jobs").json()["jobs"] == []

    bad = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "x", "-n", "1", "--lane", "slow", api_key=QUOTE_KEY)
    assert bad.returncode == ExitCode.USAGE and "--lane" in bad.stderr, bad
    api.close()


def test_lane_batch_submits_a_batch_job_and_status_shows_lanes_and_costs(stack: Stack) -> None:
    submitted = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "a slow kite", "-n", "3", "--lane", "batch")
    job_id = ok(submitted).strip()
    assert JOB_ID.match(job_id) and "batch lane" in submitted.stderr, submitted
    view = httpx.get(f"{stack.gateway_url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert view["lane"] == "batch" and view["config"]["lane"] == "batch"
    status = ok(bunch(stack.gateway_url, "status", job_id))
    assert re.search(r"^lane\s+batch\s*$", status, re.MULTILINE), status
    assert re.search(r"^cost( so far)?\s+\$", status, re.MULTILINE), status  # "so far" while it runs
    listing = ok(bunch(stack.gateway_url, "jobs"))
    assert "batch" in next(line for line in listing.splitlines() if job_id in line)

    realtime = bunch(stack.gateway_url, "submit", "semi-auto", "-p", "a quick kite", "-n", "2", "--wait")
    realtime_id = ok(realtime).strip()
    cost = json.loads(ok(bunch(stack.gateway_url, "status", realtime_id, "--json")))["cost"]
    assert cost["lane"] == "realtime" and cost["total_usd"] > 0
    assert (
        f"Job {realtime_id} completed: 2 of 2 images, cost {usd(cost['total_usd'])} (realtime lane)" in realtime.stderr
    )
    shown = ok(bunch(stack.gateway_url, "status", realtime_id))
    assert re.search(rf"^cost\s{{2,}}{re.escape(usd(cost['total_usd']))} \(Gemini ", shown, re.MULTILINE), shown


def test_a_job_over_the_budget_is_refused_with_its_figures(stack: Stack) -> None:
    args = ("submit", "semi-auto", "-p", "an expensive fox", "-n", "4")
    dry = bunch(stack.gateway_url, *args, "--dry-run", api_key=POOR_KEY)
    printed = ok(dry)
    assert "Budget: $0.0001 of $0.0001 left this day (spent $0.00); resets at " in printed, printed
    assert "Over budget: " in printed and "a submit would be refused" in printed, printed

    refused = bunch(stack.gateway_url, *args, api_key=POOR_KEY)
    assert refused.returncode == ExitCode.BUDGET, refused
    assert refused.stdout == "" and "Traceback" not in refused.stderr
    assert "(HTTP 402)" in refused.stderr and "spent $0.00 of $0.0001 this day, $0.0001 left" in refused.stderr
    assert re.search(r"This job: \$0\.\d{4};", refused.stderr), refused.stderr
    listing = httpx.get(f"{stack.gateway_url}/api/jobs", headers={"Authorization": f"Bearer {POOR_KEY}"}).json()
    assert listing["jobs"] == []


# --- idempotent submits: one key per request, sent again with it when the answer is lost ---------

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@dataclass
class Seen:
    """One request as it reached the proxy, and what the gateway answered if it was let through."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    treatment: str
    answer: bytes = b""

    def answer_json(self) -> Any:
        return json.loads(self.answer.split(b"\r\n\r\n", 1)[1])


class FlakyProxy:
    """A real TCP proxy in front of the gateway, one request per connection (it asks the gateway
    for `Connection: close`, whose answer tells the client to open a new connection for the next).

    `plan` maps "METHOD /path" to what its first requests get, in order, before the rest pass:
    "drop" sends the request on, waits for the gateway's whole answer (so whatever it created
    exists) and closes the client's connection without passing it on, an answer lost on the way;
    "busy" answers 409 with Retry-After: 0 (the key's first request still running), "unavailable"
    503 with Retry-After: 0, neither reaching the gateway. Every request is kept in `seen`."""

    def __init__(self, upstream: str, plan: dict[str, list[str]]) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.plan = {route: list(steps) for route, steps in plan.items()}
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy.serve(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def requests(self, method: str, path: str) -> list[Seen]:
        with self.lock:
            return [seen for seen in self.seen if (seen.method, seen.path) == (method, path)]

    def serve(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return  # the client went away (a keep-alive connection it never used)
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
        }
        assert "chunked" not in headers.get("transfer-encoding", ""), "the CLI sends bodies of known length"
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = client.recv(65536)
            assert chunk, "the client sent less than its Content-Length"
            body += chunk
        route = f"{method} {target.split('?')[0]}"
        with self.lock:
            steps = self.plan.get(route)
            treatment = steps.pop(0) if steps else "pass"
            seen = Seen(method, target.split("?")[0], headers, body, treatment)
            self.seen.append(seen)
        if treatment in ("busy", "unavailable"):
            status = "409 Conflict" if treatment == "busy" else "503 Service Unavailable"
            detail = json.dumps({"detail": f"proxy: {treatment}"}).encode()
            client.sendall(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(detail)}\r\n"
                "Retry-After: 0\r\nConnection: close\r\n\r\n".encode()
                + detail
            )
            return
        kept = [line for line in lines[1:] if not line.lower().startswith(("connection:", "keep-alive:"))]
        forwarded = "\r\n".join([lines[0], *kept, "Connection: close"]).encode() + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=60) as upstream:
            upstream.sendall(forwarded)
            answer = b""
            while chunk := upstream.recv(65536):
                answer += chunk
        seen.answer = answer
        if treatment == "pass":
            client.sendall(answer)
        # "drop": the connection closes with nothing sent back; the client cannot tell whether the
        # request ran.


def job_count(stack: Stack, api_key: str) -> int:
    listing = httpx.get(
        f"{stack.gateway_url}/api/jobs", params={"limit": 200}, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert listing.status_code == 200, listing.text
    return len(listing.json()["jobs"])


def test_the_same_key_and_body_get_the_first_job_back_and_another_body_is_refused(stack: Stack) -> None:
    before = job_count(stack, KEYS_KEY)
    body = {"mode": "semi_auto", "group": "cli-keys", "prompts": ["a brass key"], "images_per_prompt": 1}
    key = str(uuid.uuid4())
    with BunchClient(stack.gateway_url, KEYS_KEY) as client:
        first = client.submit(body, idempotency_key=key)
        again = client.submit(body, idempotency_key=key)
        assert again == first and JOB_ID.match(first["id"])
        with pytest.raises(CliError) as refused:
            client.submit({**body, "prompts": ["a copper key"]}, idempotency_key=key)
        assert refused.value.status == 422 and refused.value.exit_code == ExitCode.USAGE, refused.value.message
        other = client.submit(body)  # a key of its own: a job of its own
        assert other["id"] != first["id"]
    assert job_count(stack, KEYS_KEY) == before + 2


def test_a_submit_whose_answers_are_lost_or_refused_for_now_queues_one_job(stack: Stack, tmp_path: Path) -> None:
    before = job_count(stack, KEYS_KEY)
    ref = tmp_path / "key.png"
    ref.write_bytes(png_bytes(seed=77))
    plan = {"POST /api/uploads": ["drop"], "POST /api/jobs": ["busy", "drop", "unavailable"]}
    with FlakyProxy(stack.gateway_url, plan) as proxy:
        result = bunch(proxy.url, "submit", "semi-auto", "-p", "a lost answer", "-n", "2", "--ref", str(ref),
                       api_key=KEYS_KEY)  # fmt: skip
        job_id = ok(result).strip()
        uploads, submits = proxy.requests("POST", "/api/uploads"), proxy.requests("POST", "/api/jobs")
    assert [seen.treatment for seen in uploads] == ["drop", "pass"]
    assert [seen.treatment for seen in submits] == ["busy", "drop", "unavailable", "pass"]  # 4 attempts: all there are
    for attempts in (uploads, submits):
        keys = {seen.headers.get("idempotency-key") for seen in attempts}
        assert len(keys) == 1 and UUID4.match(str(next(iter(keys)))), keys
        assert len({seen.body for seen in attempts}) == 1  # the very same request, file and boundary included
    assert uploads[0].headers["idempotency-key"] != submits[0].headers["idempotency-key"]
    assert result.stderr.count("sending it again with the same Idempotency-Key") == 4, result.stderr

    # The upload and the job the lost answers told of are the ones the CLI went on with: nothing twice.
    lost_upload = uploads[0].answer_json()["uploads"][0]["id"]
    assert submits[1].answer_json()["id"] == job_id
    assert json.loads(submits[3].body)["reference_ids"] == [lost_upload]
    assert job_count(stack, KEYS_KEY) == before + 1


def test_a_dataset_upload_whose_answer_is_lost_is_sent_again_whole(stack: Stack, tmp_path: Path) -> None:
    before = job_count(stack, KEYS_KEY)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        (folder / f"p{index}.png").write_bytes(png_bytes(32, 32, seed=80 + index))
    with FlakyProxy(stack.gateway_url, {"POST /api/datasets": ["drop"], "POST /api/jobs": ["drop"]}) as proxy:
        result = bunch(proxy.url, "submit", "auto", "-p", "as a mosaic", str(folder), api_key=KEYS_KEY)
        job_id = ok(result).strip()
        datasets, submits = proxy.requests("POST", "/api/datasets"), proxy.requests("POST", "/api/jobs")
    assert [seen.treatment for seen in datasets] == ["drop", "pass"]
    assert datasets[0].body == datasets[1].body and len(datasets[0].body) > 0  # the ZIP read again from its start
    assert datasets[0].headers["idempotency-key"] == datasets[1].headers["idempotency-key"]
    assert "2 image(s) accepted" in result.stderr, result.stderr
    assert json.loads(submits[1].body)["dataset_id"] == datasets[0].answer_json()["id"]
    assert submits[0].answer_json()["id"] == job_id and job_count(stack, KEYS_KEY) == before + 1


def test_sending_again_is_bounded_and_refusals_are_not_sent_again(stack: Stack) -> None:
    plan = {"POST /api/jobs": ["unavailable"] * 4}
    with FlakyProxy(stack.gateway_url, plan) as proxy:
        result = bunch(proxy.url, "submit", "semi-auto", "-p", "never", "-n", "1", api_key=KEYS_KEY)
        assert result.returncode == ExitCode.SERVER, result
        assert "The server failed on POST /api/jobs (HTTP 503): proxy: unavailable" in result.stderr, result.stderr
        submits = proxy.requests("POST", "/api/jobs")
        assert len(submits) == 4 and len({seen.headers["idempotency-key"] for seen in submits}) == 1

        # A 409 without Retry-After (the job cannot be retried) and a 404 are answers, not failures.
        missing = bunch(proxy.url, "retry", "0" * 32, api_key=KEYS_KEY)
        assert missing.returncode == ExitCode.NOT_FOUND, missing
        job_id = ok(bunch(proxy.url, "submit", "semi-auto", "-p", "a fine kite", "-n", "1", api_key=KEYS_KEY)).strip()
        refused = bunch(proxy.url, "retry", job_id, api_key=KEYS_KEY)
        assert refused.returncode == ExitCode.NOT_FOUND and "(HTTP 409)" in refused.stderr, refused
        assert len(proxy.requests("POST", "/api/jobs/" + "0" * 32 + "/retry")) == 1
        assert len(proxy.requests("POST", f"/api/jobs/{job_id}/retry")) == 1
        assert "sending it again" not in missing.stderr + refused.stderr


# --- exports to the project's own bucket ----------------------------------------------------------


def exported(minio: Minio, prefix: str) -> list[str]:
    return sorted(str(item.object_name) for item in minio.list_objects(EXPORT_BUCKET, prefix=prefix, recursive=True))


def test_export_copies_a_groups_images_into_the_projects_bucket(stack: Stack) -> None:
    minio = stack_bucket(stack, EXPORT_BUCKET)
    destinations = ok(bunch(stack.gateway_url, "export-destinations"))
    row = next(line for line in destinations.splitlines() if line.startswith("archive"))
    assert row.split() == ["archive", stack.s3_url, EXPORT_BUCKET, "bunch-out"], destinations
    listed = json.loads(ok(bunch(stack.gateway_url, "export-destinations", "--json")))
    assert listed == {
        "destinations": [{"name": "archive", "endpoint": stack.s3_url, "bucket": EXPORT_BUCKET, "prefix": "bunch-out"}]
    }

    job_id = ok(
        bunch(stack.gateway_url, "submit", "semi-auto", "-g", "cli-export", "-p", "a kettle", "-n", "3", "--wait")
    ).strip()
    by_group = bunch(stack.gateway_url, "export", "--destination", "archive", "--group", "cli-export")
    export_id = ok(by_group).strip()
    assert export_id and "\n" not in export_id, by_group.stdout
    assert f"Export {export_id} completed: 4 copied, 0 skipped, 0 failed of 4 objects" in by_group.stderr  # + manifest
    folder = f"bunch-out/cli-export/{job_id}/"
    assert exported(minio, folder) == [f"{folder}{index:05d}.png" for index in range(3)] + [f"{folder}manifest.json"]

    flat = bunch(
        stack.gateway_url, "export", "-d", "archive", "--job", job_id, "--layout", "flat", "--no-manifest", "--json"
    )
    view = json.loads(ok(flat))
    assert (view["status"], view["layout"], view["include_manifest"]) == ("completed", "flat", False), view
    assert view["job_ids"] == [job_id] and view["progress"]["objects_failed"] == 0
    assert exported(minio, f"bunch-out/{job_id}-") == [f"bunch-out/{job_id}-{index:05d}.png" for index in range(3)]

    queued = bunch(stack.gateway_url, "export", "-d", "archive", "--job", job_id, "--no-wait")
    later_id = ok(queued).strip()
    assert later_id not in (export_id, view["id"]) and "Export " in queued.stderr and "completed" not in queued.stderr


def test_export_refusals_exit_with_the_clis_codes(stack: Stack) -> None:
    nowhere = bunch(stack.gateway_url, "export", "--destination", "nowhere", "--job", "0" * 32)
    assert nowhere.returncode == ExitCode.NOT_FOUND and nowhere.stdout == "", nowhere
    assert "No such export destination in this project: 'nowhere'." in nowhere.stderr, nowhere.stderr
    assert "(HTTP 404)" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr
    unknown = bunch(stack.gateway_url, "export", "-d", "archive", "--group", "0" * 32)
    assert unknown.returncode == ExitCode.NOT_FOUND and "No such group in this project" in unknown.stderr, unknown
    by_name = bunch(stack.gateway_url, "export", "-d", "archive", "--group", "no-such-group")
    assert by_name.returncode == ExitCode.NOT_FOUND, by_name
    assert "No such group in this project: 'no-such-group'" in by_name.stderr
    for kinds in ((), ("--group", "a", "--job", "0" * 32)):
        refused = bunch(stack.gateway_url, "export", "-d", "archive", *kinds)
        assert refused.returncode == ExitCode.USAGE and "either --group or --job" in refused.stderr, refused
    none = bunch(stack.gateway_url, "export-destinations", api_key=QUOTE_KEY)
    assert ok(none) == "" and "No export destinations" in none.stderr
