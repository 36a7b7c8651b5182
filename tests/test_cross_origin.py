"""A front-end served from another origin calls Bunch from a real browser (Debian's Chromium driven by
Playwright) against the real stack started with BUNCH_CORS_ORIGINS: preflighted submits with an
Idempotency-Key, the exposed headers, the job's event stream read with fetch and the Authorization
header, and an origin not listed kept from every answer. The console's own keys are checked here too.
"""

import base64
import http.server
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, expect

from deploy.stack import Stack
from tests.chromium import chromium, needs_chromium
from tests.stack_helpers import QUICK_TIMERS, client, png_bytes, running_stack

KEY = "cross-origin-key"
CONSOLE_KEY = "cross-console-key"  # a project of its own for the console's submits
# A name only this browser resolves (to the loopback): a plain-http origin that is no secure
# context, where crypto.randomUUID does not exist, as for a console opened at http://<server>:8000.
INSECURE_HOST = "bunch-console.test"
JOB = {"mode": "semi_auto", "group": "cross-origin", "prompts": ["a kite over the dunes"], "images_per_prompt": 2}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

pytestmark = needs_chromium

# The front-end: what a browser app on another origin does with Bunch, as console.js does it.
FRONT_END = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A front-end on another origin</title>
<script>
"use strict";
const FINAL = new Set(["completed", "failed", "canceled"]);

// One API call; what a front-end can read of the answer (the exposed headers included).
async function call(gateway, apiKey, path, { method = "GET", json, form, key } = {}) {
  const headers = { Authorization: `Bearer ${apiKey}` };
  if (key) headers["Idempotency-Key"] = key;
  let body = form;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  const response = await fetch(gateway + path, { method, headers, body });
  const text = await response.text();
  return {
    status: response.status, body: text ? JSON.parse(text) : null, location: response.headers.get("Location"),
    key: response.headers.get("Idempotency-Key"), replayed: response.headers.get("Idempotent-Replayed"),
  };
}

// A job's Server-Sent Events over fetch (EventSource cannot send Authorization), until its final
// status; `afterSnapshot` runs once the stream is open and its first event read.
async function events(gateway, apiKey, jobId, afterSnapshot) {
  const headers = { Authorization: `Bearer ${apiKey}` };
  const response = await fetch(`${gateway}/api/jobs/${jobId}/events`, { headers });
  const seen = [], reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return seen;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = { type: "message", data: "" };
      for (const line of block.split("\\n")) {
        if (line.startsWith("event:")) event.type = line.slice(6).trim();
        else if (line.startsWith("data:")) event.data += line.slice(5).trim();
      }
      if (!event.data) continue;
      const data = JSON.parse(event.data);
      seen.push({ type: event.type, status: data.status });
      if (event.type === "snapshot") await afterSnapshot();
      else if (FINAL.has(data.status)) { await reader.cancel(); return seen; }
    }
  }
}

function imageForm(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const form = new FormData();
  form.append("files", new Blob([bytes], { type: "image/png" }), "reference.png");
  return form;
}
</script></head><body><p>A front-end on another origin.</p></body></html>
"""


class StaticSite:
    """The front-end's page, served on an origin of its own (another port on the loopback)."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(FRONT_END)))
                self.end_headers()
                self.wfile.write(FRONT_END)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def sites() -> Iterator[tuple[StaticSite, StaticSite]]:
    """The front-end's origin, listed in BUNCH_CORS_ORIGINS, and a stranger's, not listed."""
    front, stranger = StaticSite(), StaticSite()
    yield front, stranger
    front.close()
    stranger.close()


@pytest.fixture(scope="module")
def stack(sites: tuple[StaticSite, StaticSite]) -> Iterator[Stack]:
    front, _ = sites
    with running_stack(
        "bunch-cors-",
        api_keys=f"{KEY}:cross-origin,{CONSOLE_KEY}:cross-console",
        service_env={**QUICK_TIMERS, "BUNCH_CORS_ORIGINS": f"https://app.example.com,{front.origin}"},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium(f"--host-resolver-rules=MAP {INSECURE_HOST} 127.0.0.1") as browser:
        yield browser


async def page_at(browser: Browser, origin: str) -> Page:
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(origin + "/")
    return page


async def job_ids(stack: Stack, api_key: str) -> list[str]:
    async with client(stack, api_key) as api:
        response = await api.get("/api/jobs", params={"limit": 200})
        assert response.status_code == 200, response.text
        return [job["id"] for job in response.json()["jobs"]]


async def test_a_front_end_uploads_submits_twice_with_one_key_and_follows_the_job(
    browser: Browser, stack: Stack, sites: tuple[StaticSite, StaticSite]
) -> None:
    front, _ = sites
    before = await job_ids(stack, KEY)
    page = await page_at(browser, front.origin)
    upload_key, job_key = str(uuid.uuid4()), str(uuid.uuid4())
    async with client(stack, KEY) as api:
        # Paused, the project's job stays queued until the page has its event stream open: the
        # stream then sees the job run and end live, whatever the timing.
        assert (await api.post("/api/queue/pause")).status_code == 200
    try:
        result = await page.evaluate(
            """async ([gateway, apiKey, png, uploadKey, jobKey, template]) => {
                // Each sending is a new FormData, so a new multipart boundary: still the same request.
                const upload = () => call(gateway, apiKey, "/api/uploads",
                                          { method: "POST", form: imageForm(png), key: uploadKey });
                const uploaded = await upload(), uploadedAgain = await upload();
                const job = { ...template, reference_ids: [uploaded.body.uploads[0].id] };
                const first = await call(gateway, apiKey, "/api/jobs", { method: "POST", json: job, key: jobKey });
                const again = await call(gateway, apiKey, "/api/jobs", { method: "POST", json: job, key: jobKey });
                const seen = await events(gateway, apiKey, first.body.id,
                  () => call(gateway, apiKey, "/api/queue/resume", { method: "POST" }));
                const status = await call(gateway, apiKey, `/api/jobs/${first.body.id}/status`);
                return { uploaded, uploadedAgain, first, again, seen, status, job };
            }""",
            [stack.gateway_url, KEY, base64.b64encode(png_bytes(seed=5)).decode(), upload_key, job_key, JOB],
        )
    finally:
        async with client(stack, KEY) as api:
            await api.post("/api/queue/resume")
        await page.context.close()

    uploaded, again = result["uploaded"], result["uploadedAgain"]
    assert uploaded["status"] == again["status"] == 201 and again["body"] == uploaded["body"]
    assert (uploaded["key"], again["key"], uploaded["replayed"], again["replayed"]) == (
        upload_key,
        upload_key,
        None,
        "true",
    )

    first, repeat = result["first"], result["again"]
    assert first["status"] == repeat["status"] == 202, first
    job_id = first["body"]["id"]
    assert repeat["body"]["id"] == job_id and first["key"] == repeat["key"] == job_key
    assert first["replayed"] is None and repeat["replayed"] == "true"
    # Location, where the route sets one, is readable cross-origin and kept for the replay.
    assert repeat["location"] == first["location"]
    async with client(stack, KEY) as api:
        replayed = await api.post("/api/jobs", json=result["job"], headers={"Idempotency-Key": job_key})
    assert replayed.status_code == 202 and replayed.json()["id"] == job_id
    assert first["location"] == replayed.headers.get("location")

    seen = result["seen"]
    assert seen[0] == {"type": "snapshot", "status": "queued"}, seen
    assert seen[-1] == {"type": "status", "status": "completed"}, seen
    assert result["status"]["body"]["progress"]["images_succeeded"] == 2
    assert await job_ids(stack, KEY) == [job_id, *before]  # one job for the two submits


async def test_error_answers_are_readable_by_a_listed_origin_and_no_answer_by_another(
    browser: Browser, stack: Stack, sites: tuple[StaticSite, StaticSite]
) -> None:
    front, stranger = sites
    before = await job_ids(stack, KEY)
    script = """async ([gateway, apiKey, key]) => {
        const outcome = async (attempt) => {
            try { return { read: (await attempt()).status }; } catch (err) { return { refused: err.name }; }
        };
        const job = { mode: "semi_auto", prompts: ["a stranger's kite"], images_per_prompt: 1 };
        return {
            submit: await outcome(() => call(gateway, apiKey, "/api/jobs", { method: "POST", json: job, key })),
            wrongKey: await outcome(() => call(gateway, "not-a-key", "/api/jobs")),
            plainGet: await outcome(() => fetch(gateway + "/healthz")),
        };
    }"""
    listed = await page_at(browser, front.origin)
    unlisted = await page_at(browser, stranger.origin)
    try:
        mine = await listed.evaluate(script, [stack.gateway_url, "not-a-key", str(uuid.uuid4())])
        theirs = await unlisted.evaluate(script, [stack.gateway_url, KEY, str(uuid.uuid4())])
    finally:
        await listed.context.close()
        await unlisted.context.close()
    # A listed origin reads every answer, errors included; an unlisted one reads none, not even a
    # plain GET, and its preflighted submit is never sent.
    assert mine == {"submit": {"read": 401}, "wrongKey": {"read": 401}, "plainGet": {"read": 200}}
    assert theirs == {kind: {"refused": "TypeError"} for kind in ("submit", "wrongKey", "plainGet")}
    assert await job_ids(stack, KEY) == before


def test_preflights_and_answers_carry_the_cors_headers(stack: Stack, sites: tuple[StaticSite, StaticSite]) -> None:
    front, stranger = sites
    with httpx.Client(base_url=stack.gateway_url, timeout=10) as api:
        submit = api.options(
            "/api/jobs",
            headers={
                "Origin": front.origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert submit.status_code == 200, submit.text
        assert submit.headers["access-control-allow-origin"] == front.origin
        methods = {m.strip() for m in submit.headers["access-control-allow-methods"].split(",")}
        assert {"GET", "POST", "PATCH", "DELETE"} <= methods
        allowed = {h.strip().lower() for h in submit.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= allowed
        assert "access-control-allow-credentials" not in submit.headers  # the key is a header, not a cookie
        assert int(submit.headers["access-control-max-age"]) > 0

        stream = api.options(
            "/api/jobs/0123/events",
            headers={
                "Origin": front.origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization, last-event-id",
            },
        )
        assert stream.status_code == 200 and stream.headers["access-control-allow-origin"] == front.origin

        refused = api.options(
            "/api/jobs",
            headers={"Origin": stranger.origin, "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code >= 400 and "access-control-allow-origin" not in refused.headers

        answer = api.get("/api/jobs", headers={"Origin": front.origin, "Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == front.origin
        exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
        assert {"location", "retry-after", "idempotency-key", "idempotent-replayed"} <= exposed
        assert "origin" in answer.headers.get("vary", "").lower()  # caches keep one answer per origin
        plain = api.get("/api/jobs", headers={"Origin": stranger.origin, "Authorization": f"Bearer {KEY}"})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


async def test_the_console_sends_one_new_key_per_job_and_upload_even_without_random_uuid(
    browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    """Over plain http on a name that is not the loopback's, crypto.randomUUID does not exist: the
    console makes its keys from getRandomValues."""
    ref = tmp_path / "ref.png"
    ref.write_bytes(png_bytes(40, 40, seed=12))
    port = stack.gateway_url.rsplit(":", 1)[1]
    context = await browser.new_context(base_url=f"http://{INSECURE_HOST}:{port}")
    await context.add_init_script(f"localStorage.setItem('bunch.apiKey', '{CONSOLE_KEY}')")
    page = await context.new_page()
    sent: list[tuple[str, str | None]] = []

    async def creating(request: Request) -> None:
        if request.method == "POST" and not request.url.endswith("/api/jobs/quote"):
            sent.append((request.url.split(port, 1)[1], await request.header_value("idempotency-key")))

    page.on("request", creating)
    try:
        await page.goto("/")
        assert await page.evaluate("() => [window.isSecureContext, typeof crypto.randomUUID]") == [False, "undefined"]
        await page.set_input_files("#references", str(ref))
        await page.fill("#prompts", "a paper kite")
        await page.fill("#batch", "1")
        await page.fill("#copies", "2")
        await expect(page.locator(".lane[data-lane=realtime] .lane-total")).to_have_text(re.compile(r"^\$\d"))
        await page.click("button[type=submit]")
        await expect(page.locator("#semi-message")).to_have_text("2 jobs submitted.")
    finally:
        await context.close()
    assert [path for path, _ in sent] == ["/api/uploads", "/api/jobs", "/api/jobs"], sent
    keys = [key for _, key in sent]
    assert all(key and UUID4.match(key) for key in keys) and len(set(keys)) == 3, keys
    assert len(await job_ids(stack, CONSOLE_KEY)) == 2
