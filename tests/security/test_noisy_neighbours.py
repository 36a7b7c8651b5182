"""One project attacks the gateway; another project's requests must not notice.

For each attack, project B's victim (tests/security/victim.py, a process of its own) polls its
job's status every 20 ms, first alone, then while project A attacks. Asserted: B's p99 during the
attack is within 2x its baseline p99 plus 50 ms, none of B's requests fails, and the gateway's
resident memory stays within RSS_GROWTH_MB of where it started (DECODE_GROWTH_MB for datasets).
Run with `-s` to see the figures:

    .venv/bin/pytest -s -p no:cacheprovider tests/security/test_noisy_neighbours.py
"""

import asyncio
import json
import statistics
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.processes import ROOT
from deploy.stack import Stack
from tests.security.bombs import distinct_images_zip, flat_png, max_pixel_pngs, overlapping_entries_zip
from tests.security.slow import open_attack
from tests.security.sse_attack import close_streams, flood_priority_changes, open_streams
from tests.stack_helpers import client, png_bytes, running_stack, submit, upload

KEY_A = "bk-noisy-attacker-Lq2Wm8Xr4"
KEY_B = "bk-noisy-victim-Pz7Kd3Ns9"
VICTIM_SECONDS = 4.0
RSS_GROWTH_MB = 150  # what the gateway may grow by during an attack
# Datasets are decoded one image at a time per process (BUNCH_DATASET_DECODE_THREADS=1): a
# 40-megapixel image is 120 MB of pixels while it is checked.
DECODE_GROWTH_MB = 200

Attack = Callable[[Stack, httpx.AsyncClient], Awaitable[None]]


@dataclass
class Figures:
    p50_ms: float
    p99_ms: float
    requests: int
    errors: list[str]
    rss_start_mb: float
    rss_peak_mb: float


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running_stack(
        "bunch-noisy-",
        api_keys=f"{KEY_A}:attacker,{KEY_B}:victim",
        services=("gateway",),
        service_env={"BUNCH_SSE_KEEPALIVE_SECONDS": "1"},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
async def victim_path(stack: Stack) -> str:
    async with client(stack, KEY_B) as api:
        job = await submit(api, {"mode": "semi_auto", "prompts": ["mine"], "images_per_prompt": 4})
    return f"/api/jobs/{job}/status"


@pytest.fixture
async def attacker(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack, KEY_A) as api:
        yield api


def rss_mb(stack: Stack) -> float:
    popen = stack.processes["gateway-0"].popen
    assert popen is not None
    for line in Path(f"/proc/{popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def victim_figures(stack: Stack, path: str, attack: Awaitable[None] | None = None) -> Figures:
    rss_start = rss_peak = rss_mb(stack)
    running = asyncio.ensure_future(attack) if attack is not None else None
    if running is not None:
        await asyncio.sleep(0.5)  # the attack under way before the first measured request
    victim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.security.victim",
        stack.gateway_url,
        KEY_B,
        path,
        str(VICTIM_SECONDS),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        communicate = asyncio.ensure_future(victim.communicate())
        while not communicate.done():
            rss_peak = max(rss_peak, rss_mb(stack))
            await asyncio.wait([communicate], timeout=0.1)
        out, _ = communicate.result()
    finally:
        if running is not None:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    measured = json.loads(out)
    latencies = sorted(measured["latencies_ms"])
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return Figures(statistics.median(latencies), p99, len(latencies), measured["errors"], rss_start, rss_peak)


async def assert_unharmed(
    stack: Stack, path: str, name: str, attack: Awaitable[None], rss_growth_mb: float = RSS_GROWTH_MB
) -> None:
    baseline = await victim_figures(stack, path)
    during = await victim_figures(stack, path, attack)
    print(
        f"\n{name}: victim p50 {baseline.p50_ms:.1f} -> {during.p50_ms:.1f} ms, "
        f"p99 {baseline.p99_ms:.1f} -> {during.p99_ms:.1f} ms ({during.requests} requests); "
        f"gateway RSS {during.rss_start_mb:.0f} -> peak {during.rss_peak_mb:.0f} MB"
    )
    assert not baseline.errors and not during.errors, during.errors[:5]
    assert during.p99_ms <= 2 * baseline.p99_ms + 50, (name, baseline, during)
    assert during.rss_peak_mb - during.rss_start_mb <= rss_growth_mb, (name, during)


# --- the attacks ---


async def read_results_forever(api: httpx.AsyncClient, job: str, readers: int = 4) -> None:
    """`readers` clients at once, each reading every page of the job's results, again and again."""

    async def reader() -> None:
        while True:
            cursor: str | None = None
            while True:
                params: dict[str, str | int] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
                page = (await api.get(f"/api/jobs/{job}/results", params=params)).json()
                cursor = page["next_cursor"]
                if cursor is None:
                    break

    await asyncio.gather(*(reader() for _ in range(readers)))


async def test_results_of_a_huge_job(stack: Stack, victim_path: str, attacker: httpx.AsyncClient) -> None:
    refs = await upload(attacker, [png_bytes(seed=3)])
    prompts = [f"{n} " + "a long prompt " * 285 for n in range(100)]  # 100 prompts of ~4,000 characters
    body = {"mode": "semi_auto", "prompts": prompts, "images_per_prompt": 100, "reference_ids": refs}
    job = await submit(attacker, body)  # 10,000 images; no dispatcher runs, so it stays queued
    await assert_unharmed(stack, victim_path, "results of a 10,000-image job", read_results_forever(attacker, job))


async def hold_slow_connections(url: str, stalled_headers: int = 1000, stalled_bodies: int = 200) -> None:
    """Slowloris: connections that never finish their headers, and bodies that stall half-way."""
    attack = await asyncio.to_thread(open_attack, url, stalled_headers, stalled_bodies, (KEY_A,))
    try:
        while True:
            await asyncio.to_thread(attack.poll, 0.2)
    finally:
        attack.close()


async def test_a_thousand_slow_connections(stack: Stack, victim_path: str) -> None:
    await assert_unharmed(
        stack, victim_path, "1,000 stalled headers + 200 stalled bodies", hold_slow_connections(stack.gateway_url)
    )


async def stall_event_streams_and_flood(stack: Stack, api: httpx.AsyncClient, streams: int = 500) -> None:
    """Streams that never read (the per-project cap refuses those past it), and a flood of cheap
    events for them: priority changes of a queued job, each an event."""
    job = await submit(api, {"mode": "semi_auto", "prompts": ["flood"], "images_per_prompt": 1})
    opened = await asyncio.to_thread(open_streams, stack.gateway_url, KEY_A, streams)
    try:
        while True:
            await flood_priority_changes(api, job, 500)
    finally:
        close_streams(opened)


async def test_stalled_event_streams_and_an_event_flood(
    stack: Stack, victim_path: str, attacker: httpx.AsyncClient
) -> None:
    name = "500 non-reading event streams + a flood of events"
    await assert_unharmed(stack, victim_path, name, stall_event_streams_and_flood(stack, attacker))


async def upload_worst_datasets(api: httpx.AsyncClient, at_once: int = 4) -> None:
    """`at_once` uploads at a time, again and again, of the worst datasets: one 40-megapixel PNG
    listed 150 times in an 8 KB ZIP, and distinct 40-megapixel PNGs (each a full decode)."""
    image = flat_png()
    overlapping = overlapping_entries_zip(image, 150)
    distinct = distinct_images_zip(max_pixel_pngs(8))

    async def uploader(n: int) -> None:
        archive = overlapping if n % 2 else distinct
        while True:
            files = [("files", (f"bomb{n}.zip", archive, "application/zip"))]
            response = await api.post("/api/datasets", files=files)
            assert response.status_code in (201, 413, 422), response.text

    await asyncio.gather(*(uploader(n) for n in range(at_once)))


async def test_the_worst_datasets_at_once(stack: Stack, victim_path: str, attacker: httpx.AsyncClient) -> None:
    name = "4 worst datasets at a time"
    await assert_unharmed(stack, victim_path, name, upload_worst_datasets(attacker), DECODE_GROWTH_MB)
