"""The web console in a real browser (Debian's Chromium driven by Playwright) against the real stack."""

import asyncio
import io
import json
import os
import re
import shutil
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, Request, expect

from deploy.processes import ROOT, scratch_dir
from deploy.stack import SERVICES, Stack, start_stack
from tests.chromium import chromium, needs_chromium
from tests.stack_helpers import client, emulator, png_bytes, stack_bucket, submit, wait_final

KEY = "console-key"
POOR_KEY = "console-poor-key"  # a project whose budget no job fits
# Screenshots go to a scratch folder unless BUNCH_SCREENSHOTS names another (docs/screenshots).
SHOTS = Path(os.environ.get("BUNCH_SCREENSHOTS", "")) if os.environ.get("BUNCH_SCREENSHOTS") else None
# Project console's export destination: a bucket of its own on the stack's S3 server (moto takes
# any credentials; these are Settings' defaults), the credentials named by environment variables.
EXPORT_BUCKET = "console-exports"
EXPORT_CREDENTIALS = {"CONSOLE_EXPORT_KEY_ID": "minioadmin", "CONSOLE_EXPORT_SECRET": "minioadmin"}

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = scratch_dir("bunch-console-")
    stack = start_stack(
        workdir,
        api_keys=f"{KEY}:console,{POOR_KEY}:console-poor",
        service_env={
            "BUNCH_MAX_CONCURRENCY": "4",
            "BUNCH_PROJECT_BUDGETS": "console-poor:0.0001/month",
            **EXPORT_CREDENTIALS,
        },
        services=(),
    )
    try:
        # The destination's endpoint is the stack's S3 server, whose port is known once it runs:
        # the services start after it is in their settings.
        archive = {
            "endpoint": stack.s3_url,
            "bucket": EXPORT_BUCKET,
            "prefix": "console-out",
            "access_key_id_env": "CONSOLE_EXPORT_KEY_ID",
            "secret_access_key_env": "CONSOLE_EXPORT_SECRET",
        }
        stack.service_env["BUNCH_EXPORT_DESTINATIONS"] = json.dumps({"console": {"archive": archive}})
        for name in SERVICES:
            stack.start_service(name)
    except BaseException:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    yield stack
    stack.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


@pytest.fixture
async def page(browser: Browser, stack: Stack) -> AsyncIterator[Page]:
    context = await browser.new_context(
        base_url=stack.gateway_url, accept_downloads=True, viewport={"width": 1280, "height": 900}
    )
    await context.add_init_script(f"localStorage.setItem('bunch.apiKey', '{KEY}')")
    page = await context.new_page()
    yield page
    await context.close()


async def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = ROOT / SHOTS if SHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(folder / name), full_page=True)


async def zip_of_download(page: Page, button: str) -> zipfile.ZipFile:
    async with page.expect_download() as waiting:
        await page.click(button)
    download = await waiting.value
    data = await asyncio.to_thread(Path(await download.path()).read_bytes)
    return zipfile.ZipFile(io.BytesIO(data))


async def test_semi_auto_page_submits_watches_cancels_retries_and_downloads(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    refs = []
    for seed in (1, 2):
        path = tmp_path / f"ref{seed}.png"
        path.write_bytes(png_bytes(48, 48, seed=seed))
        refs.append(str(path))
    await page.goto("/")
    await page.fill("#new-group", "browser group")
    await page.set_input_files("#references", refs)
    await page.fill("#prompts", "a paper boat\na glass lighthouse")
    await page.fill("#batch", "6")
    await page.click("button[type=submit]")
    await expect(page.locator("#semi-message")).to_have_text("1 job submitted.")
    row = page.locator("#queue tbody tr").first
    await expect(row.locator(".status")).to_have_text("completed", timeout=60_000)
    await expect(row).to_contain_text("12/12")
    archive = await zip_of_download(page, "#queue tbody tr >> nth=0 >> text=Download ZIP")
    assert len([n for n in archive.namelist() if n.endswith(".png")]) == 12

    await row.locator("text=Images").click()
    await expect(page.locator("#job-thumbs .thumb img")).to_have_count(12)
    await page.locator("#job-thumbs .redo-pick").nth(3).check()
    await page.click("#redo")
    await expect(page.locator("#job-message")).to_have_text("Redoing 1 image(s).")
    await expect(row.locator(".status")).to_have_text("completed", timeout=60_000)

    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 400})
    try:
        await page.fill("#new-group", "")
        await page.fill("#prompts", "slow and long")
        await page.fill("#batch", "80")
        await page.click("button[type=submit]")
        await expect(row.locator(".status")).to_have_text("processing", timeout=30_000)
        await row.locator("text=Cancel").click()
        await expect(row.locator(".status")).to_have_text("canceled", timeout=30_000)
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})

    await page.fill("#prompts", "[emu:safety] never allowed")
    await page.fill("#batch", "2")
    await page.click("button[type=submit]")
    await expect(row.locator(".status")).to_have_text("failed", timeout=60_000)
    failed_id = await row.get_attribute("data-job")
    await row.locator("text=Images").click()
    await expect(page.locator("#job-thumbs .thumb.failed").first).to_contain_text("failed: safety_blocked")
    await row.locator("text=Retry").click()
    await expect(page.locator("#queue-message")).to_have_text("Retry submitted.")
    async with client(stack, KEY) as api:
        retried = (await api.get(f"/api/jobs/{failed_id}")).json()["retried_by"]
    assert retried and await page.locator(f"tr[data-job='{retried}']").count() == 1
    await screenshot(page, "semi_auto.png", tmp_path)


async def test_automatic_page_uploads_a_dataset_and_shows_thumbnails_and_download(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    dataset = tmp_path / "dataset.zip"
    with zipfile.ZipFile(dataset, "w") as archive:
        for n in range(5):
            archive.writestr(f"photos/{n}.png", png_bytes(40, 40, seed=30 + n))
        archive.writestr("photos/notes.txt", b"not an image")
    await page.goto("/automatic")
    await page.set_input_files("#dataset", str(dataset))
    await page.fill("#base-prompt", "as a linocut print")
    await page.fill("#variations", "2")
    await page.click("button[type=submit]")
    await expect(page.locator("#auto-message")).to_contain_text("5 image(s) accepted", timeout=30_000)
    await expect(page.locator("#rejected")).to_contain_text("notes.txt")
    await expect(page.locator("#upload-bar > span")).to_have_attribute("style", "width: 100%;")
    await expect(page.locator("#download")).to_be_enabled(timeout=60_000)
    await expect(page.locator("#thumbs .thumb img")).to_have_count(10)
    await expect(page.locator("#job-counts")).to_contain_text("done 10")
    archive = await zip_of_download(page, "#download")
    assert len([n for n in archive.namelist() if n.endswith(".png")]) == 10
    await screenshot(page, "automatic.png", tmp_path)


async def test_groups_page_downloads_several_groups(page: Page, stack: Stack, tmp_path: Path) -> None:
    async with client(stack, KEY) as api:
        for group in ("north", "south"):
            response = await api.post("/api/jobs", json={"mode": "semi_auto", "group": group, "prompts": [group],
                                                        "images_per_prompt": 2})  # fmt: skip
            assert response.status_code == 202
        for _ in range(300):
            jobs = (await api.get("/api/jobs", params={"limit": 2})).json()["jobs"]
            if all(j["status"] == "completed" for j in jobs):
                break
            await page.wait_for_timeout(200)
    await page.goto("/groups")
    for name in ("north", "south"):
        await page.locator("tr", has_text=name).locator(".group-pick").check()
    await page.click("#download-groups")
    link = page.locator("#download-link")
    await expect(link).to_be_visible(timeout=30_000)
    href = await link.get_attribute("href")
    assert href
    async with httpx.AsyncClient() as plain:
        archive = zipfile.ZipFile(io.BytesIO((await plain.get(href)).content))
    folders = {name.split("/")[0] for name in archive.namelist() if name.endswith(".png")}
    assert folders == {"north", "south"}
    await page.locator("tr", has_text="north").locator("text=View").click()
    await expect(page.locator("#group-thumbs .thumb img")).to_have_count(2)
    await screenshot(page, "groups.png", tmp_path)


async def test_groups_page_exports_a_group_to_the_projects_bucket(
    page: Page, browser: Browser, stack: Stack, tmp_path: Path
) -> None:
    minio = await asyncio.to_thread(stack_bucket, stack, EXPORT_BUCKET)
    async with client(stack, KEY) as api:
        job_id = await submit(
            api, {"mode": "semi_auto", "group": "bucket-bound", "prompts": ["a brass owl"], "images_per_prompt": 2}
        )
        assert (await wait_final(api, job_id, stack))["status"] == "completed"
    await page.goto("/groups")
    start = page.locator("#export-groups")
    await expect(start).to_be_enabled()
    await expect(page.locator("#export-hint")).to_be_hidden()
    await page.locator("tr", has_text="bucket-bound").locator(".group-pick").check()
    await start.click()
    await expect(page.locator("#export-destination")).to_have_value("archive")
    await expect(page.locator("#export-manifest")).to_be_checked()
    await page.click("#export-start")
    await expect(page.locator("#export-message")).to_contain_text("of 1 group(s) to archive started.")
    await expect(page.locator("#export-status")).to_have_text("completed", timeout=30_000)
    await expect(page.locator("#export-counts")).to_contain_text(" copied · 0 skipped · 0 failed · ")
    await expect(page.locator("#export-errors li")).to_have_count(0)
    folder = f"console-out/bucket-bound/{job_id}/"
    names = await asyncio.to_thread(
        lambda: [str(o.object_name) for o in minio.list_objects(EXPORT_BUCKET, folder, recursive=True)]
    )
    assert sorted(names) == [f"{folder}00000.png", f"{folder}00001.png", f"{folder}manifest.json"], names
    await screenshot(page, "exports.png", tmp_path)

    # A project without destinations is told why the action is off.
    context = await browser.new_context(base_url=stack.gateway_url)
    await context.add_init_script(f"localStorage.setItem('bunch.apiKey', '{POOR_KEY}')")
    other = await context.new_page()
    await other.goto("/groups")
    await expect(other.locator("#export-hint")).to_be_visible()
    await expect(other.locator("#export-groups")).to_be_disabled()
    await context.close()


async def test_a_wrong_key_is_explained(browser: Browser, stack: Stack) -> None:
    context = await browser.new_context(base_url=stack.gateway_url)
    page = await context.new_page()
    await page.goto("/")
    await expect(page.locator("main")).to_contain_text("Enter your API key")
    await page.fill("#api-key", "wrong")
    await page.press("#api-key", "Enter")
    await page.locator("#api-key").dispatch_event("change")
    await expect(page.locator("#queue-message")).to_have_text("Unknown API key.")
    await context.close()


async def test_a_refresh_asked_for_mid_flight_runs_again_after_it(page: Page) -> None:
    """The pages re-read the API on every event; news that comes while a read is in flight must
    cause one more read after it, or the page can end on an older answer (a finished job shown
    as processing)."""
    await page.goto("/")
    reads = await page.evaluate(
        """async () => {
            let news = 0;
            const reads = [], releases = [];
            const refresh = coalesced(async () => {
                const seen = news;
                await new Promise((release) => releases.push(release));
                reads.push(seen);
            });
            news = 1; const first = refresh();
            news = 2; refresh();
            news = 3; const last = refresh();
            let settled = false;
            Promise.all([first, last]).then(() => { settled = true; });
            while (!settled) {
                await new Promise((tick) => setTimeout(tick, 10));
                releases.splice(0).forEach((release) => release());
            }
            return reads;
        }"""
    )
    # One read for the first event, then one more that saw the latest news; none for each event.
    assert reads == [1, 3]


async def lane_totals(page: Page) -> tuple[str, str]:
    return (
        await page.locator(".lane[data-lane=realtime] .lane-total").inner_text(),
        await page.locator(".lane[data-lane=batch] .lane-total").inner_text(),
    )


async def test_the_lanes_are_priced_live_and_a_batch_job_is_submitted(page: Page, stack: Stack, tmp_path: Path) -> None:
    dataset = tmp_path / "lanes.zip"
    with zipfile.ZipFile(dataset, "w") as archive:
        for n in range(3):
            archive.writestr(f"{n}.png", png_bytes(40, 40, seed=60 + n))
    quotes: list[Any] = []  # the body of every quote the page asks for, in order

    def asked_quote(request: Request) -> None:
        if request.url.endswith("/api/jobs/quote"):
            quotes.append(request.post_data_json)

    page.on("request", asked_quote)
    await page.goto("/automatic")
    await expect(page.locator("#quote-message")).to_have_text("Prices show once the form is complete.")
    await page.set_input_files("#dataset", str(dataset))
    await page.fill("#base-prompt", "as a woodcut")
    await page.fill("#variations", "1")
    realtime = page.locator(".lane[data-lane=realtime] .lane-total")
    await expect(realtime).to_have_text(re.compile(r"^\$\d"), timeout=30_000)
    await expect(page.locator("#quote-message")).to_contain_text("3 image(s) with ")
    await expect(page.locator(".lane[data-lane=batch] .lane-parts")).to_contain_text("Gemini $")
    assert quotes and all(body is not None for body in quotes)  # nothing was asked while incomplete
    async with client(stack, KEY) as api:
        body = {"mode": "automatic", "base_prompt": "as a woodcut", "dataset_id": quotes[-1]["dataset_id"],
                "variations_per_image": 1, "group": "default", "lane": "realtime"}  # fmt: skip
        one = (await api.post("/api/jobs/quote", json=body)).json()
        three = (await api.post("/api/jobs/quote", json={**body, "variations_per_image": 3})).json()
    first = await lane_totals(page)
    assert one["lanes"]["batch"]["total_usd"] < one["lanes"]["realtime"]["total_usd"]

    asked = len(quotes)
    await page.fill("#variations", "3")
    await expect(page.locator("#quote-message")).to_contain_text("9 image(s) with ")
    second = await lane_totals(page)
    assert second != first and three["lanes"]["realtime"]["total_usd"] > one["lanes"]["realtime"]["total_usd"]
    assert len(quotes) == asked + 1  # typing is debounced into one request
    assert quotes[-1]["variations_per_image"] == 3

    await page.fill("#base-prompt", "")
    await expect(page.locator("#quote-message")).to_have_text("Prices show once the form is complete.")
    await expect(realtime).to_have_text("")
    await page.fill("#base-prompt", "as a woodcut")
    async with page.expect_response(
        lambda r: r.url.endswith("/api/jobs/quote") and (r.request.post_data_json or {}).get("lane") == "batch"
    ):
        await page.locator(".lane[data-lane=batch]").click()
    await expect(page.locator("input[name=lane][value=batch]")).to_be_checked()
    await expect(realtime).to_have_text(re.compile(r"^\$\d"))
    await page.click("button[type=submit]")
    message = page.locator("#auto-message")
    await expect(message).to_contain_text("3 image(s) accepted; batch job ", timeout=30_000)
    prefix = re.search(r"batch job ([0-9a-f]{8})", await message.inner_text())
    assert prefix
    await expect(page.locator("#job-counts")).to_contain_text("lane batch")
    async with client(stack, KEY) as api:
        jobs = (await api.get("/api/jobs", params={"limit": 20})).json()["jobs"]
        job_id = next(job["id"] for job in jobs if job["id"].startswith(prefix.group(1)))
        job = (await api.get(f"/api/jobs/{job_id}")).json()
    assert job["lane"] == "batch" and job["config"]["variations_per_image"] == 3
    await screenshot(page, "lanes.png", tmp_path)


async def test_a_refused_quote_shows_the_reason_and_the_queue_shows_lanes(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    refs = []
    for seed in range(4):  # gemini-2.5-flash-image takes at most 3
        path = tmp_path / f"many{seed}.png"
        path.write_bytes(png_bytes(32, 32, seed=70 + seed))
        refs.append(str(path))
    await page.goto("/")
    await page.fill("#prompts", "a red kite")
    await page.fill("#batch", "2")
    await expect(page.locator(".lane[data-lane=realtime] .lane-total")).to_have_text(re.compile(r"^\$\d"))
    await page.set_input_files("#references", refs)
    await expect(page.locator("#quote-message")).to_contain_text("Too many reference images: 4")
    await expect(page.locator("#quote-message")).to_have_class("error")
    await expect(page.locator(".lane[data-lane=realtime] .lane-total")).to_have_text("")

    await page.set_input_files("#references", refs[:1])
    await expect(page.locator(".lane[data-lane=realtime] .lane-total")).to_have_text(re.compile(r"^\$\d"))
    await page.fill("#new-group", "lanes")
    await page.click("button[type=submit]")
    await expect(page.locator("#semi-message")).to_have_text("1 job submitted.")
    row = page.locator("#queue tbody tr").first
    await expect(row.locator(".lane-cell")).to_have_text("realtime")
    await expect(row.locator(".status")).to_have_text("completed", timeout=60_000)
    await expect(row.locator(".cost-cell")).to_have_text(re.compile(r"^\$\d"))
    async with client(stack, KEY) as api:
        view = (await api.get(f"/api/jobs/{await row.get_attribute('data-job')}/status")).json()
    assert view["cost"]["lane"] == "realtime" and view["cost"]["total_usd"] > 0


async def test_only_the_latest_quote_is_shown(page: Page) -> None:
    """Quotes are asked as the form changes; an older answer that lands after a newer one must
    not overwrite it (the page would show the price of what the form no longer holds)."""
    await page.goto("/")
    shown = await page.evaluate(
        """async () => {
            const releases = {};
            const quote = latestOnly((n) => new Promise((release) => { releases[n] = () => release(n); }));
            const shown = [];
            const ask = (n) => quote(n).then((answer) => { if (answer) shown.push(answer.value); });
            const first = ask(1), second = ask(2);
            releases[2](); await second;
            releases[1](); await first;
            const third = ask(3);
            quote.cancel();  // the form became incomplete: nothing in flight may show
            releases[3](); await third;
            return shown;
        }"""
    )
    assert shown == [2]


async def test_the_budget_is_shown_and_a_job_over_it_is_refused_with_its_figures(
    browser: Browser, stack: Stack
) -> None:
    context = await browser.new_context(base_url=stack.gateway_url)
    await context.add_init_script(f"localStorage.setItem('bunch.apiKey', '{POOR_KEY}')")
    page = await context.new_page()
    await page.goto("/")
    await page.fill("#prompts", "a costly comet")
    await page.fill("#batch", "3")
    budget = page.locator("#budget")
    await expect(budget).to_contain_text("Budget: $0.00010 of $0.00010 left this month (spent $0.00); resets at ")
    await expect(budget).to_contain_text("Over budget: ")
    await expect(budget).to_have_class("error")
    await page.click("button[type=submit]")
    message = page.locator("#semi-message")
    await expect(message).to_have_class("error")
    await expect(message).to_contain_text("budget")
    await expect(message).to_contain_text("spent $0.00 of $0.00010 this month, $0.00010 left; the budget resets at ")
    await expect(message).to_contain_text(re.compile(r"This job: \$\d+\.\d+;"))
    async with client(stack, POOR_KEY) as api:
        assert (await api.get("/api/jobs")).json()["jobs"] == []
    await context.close()


async def test_the_semi_auto_form_is_saved_as_a_batch_queued_and_deleted_from_the_panel(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    ref = tmp_path / "saved.png"
    ref.write_bytes(png_bytes(40, 40, seed=90))
    await page.goto("/")
    await page.fill("#new-group", "saved batches")
    await page.set_input_files("#references", str(ref))
    await page.fill("#prompts", "a tin robot\na felt owl")
    await page.fill("#batch", "3")
    await page.fill("#priority", "7")
    await page.fill("#batch-name", "robots and owls")
    await page.click("#save-batch")
    shape = "2 \N{MULTIPLICATION SIGN} 3"  # two prompts (rows) of three images (columns) each
    saved_text = f'Saved "robots and owls": {shape} (6 images), not queued.'
    await expect(page.locator("#save-message")).to_have_text(saved_text)
    row = page.locator("#batches tbody tr", has_text="robots and owls")
    await expect(row).to_have_class("fresh")
    await expect(row.locator("td").nth(1)).to_have_text(shape)
    batch_id = await row.get_attribute("data-batch")
    async with client(stack, KEY) as api:
        saved = (await api.get(f"/api/batches/{batch_id}")).json()
    # The batch holds the body Submit would have sent, and saving it queued nothing.
    config = saved["config"]
    assert (config["mode"], config["group"]) == ("semi_auto", "saved batches")
    assert config["prompts"] == ["a tin robot", "a felt owl"]
    assert (config["images_per_prompt"], config["priority"], len(config["reference_ids"])) == (3, 7, 1)
    assert saved["jobs"] == [] and saved["latest_job_id"] is None

    # Slow answers keep the queued job unfinished while its batch's deletion is asked (and refused).
    await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 3000})
    try:
        await row.locator("text=Queue").click()
        message = page.locator("#batches-message")
        await expect(message).to_contain_text('Queued "robots and owls": job ')
        async with client(stack, KEY) as api:
            jobs = (await api.get(f"/api/batches/{batch_id}")).json()["jobs"]
        assert len(jobs) == 1
        job_id = jobs[0]["id"]
        await expect(message).to_have_text(f'Queued "robots and owls": job {job_id[:8]}.')
        job_row = page.locator(f"#queue tbody tr[data-job='{job_id}']")
        await expect(job_row.locator(".status")).not_to_have_text("completed")
        await row.locator("text=Delete").click()
        await expect(message).to_have_class("error")
        async with client(stack, KEY) as api:
            refused = await api.delete(f"/api/batches/{batch_id}")
        assert refused.status_code == 409
        await expect(message).to_have_text(refused.json()["detail"])
    finally:
        await emulator(stack, "gemini", "POST", "/_emulator/config", {"latency_ms": 0})

    await expect(job_row.locator(".status")).to_have_text("completed", timeout=60_000)
    await expect(job_row).to_contain_text("6/6")
    await expect(row.locator("td").nth(4)).to_have_text(job_id[:8])
    async with client(stack, KEY) as api:
        listed = (await api.get(f"/api/batches/{batch_id}")).json()
    assert listed["latest_job_id"] == job_id and listed["jobs"][0]["id"] == job_id
    assert listed["jobs"][0]["status"] == "completed"

    await row.locator("text=Queue").click()  # queued again: a new job of its own
    await expect(message).to_have_class("notice")
    async with client(stack, KEY) as api:
        jobs = (await api.get(f"/api/batches/{batch_id}")).json()["jobs"]
    assert len(jobs) == 2 and jobs[1]["id"] == job_id  # newest first
    again = jobs[0]["id"]
    await expect(message).to_have_text(f'Queued "robots and owls": job {again[:8]}.')
    await expect(page.locator(f"#queue tbody tr[data-job='{again}'] .status")).to_have_text("completed", timeout=60_000)
    await expect(row.locator("td").nth(4)).to_have_text(again[:8])
    await expect(page.locator("#queue-message")).to_have_text("")
    await screenshot(page, "saved_batches.png", tmp_path)

    await row.locator("text=Delete").click()
    await expect(page.locator("#batches-message")).to_have_text('Deleted "robots and owls".')
    await expect(page.locator("#batches tbody tr[data-batch]")).to_have_count(0)
    async with client(stack, KEY) as api:
        assert (await api.get(f"/api/batches/{batch_id}")).status_code == 404
