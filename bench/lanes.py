"""What a 1,000-image automatic job costs in each lane, side by side from one run.

One stack, one dataset of --inputs images, the same automatic job (--variations per input) submitted
once with "lane": "realtime" (RunPod runs of 4 through the RunPod emulator and the real worker) and
once with "lane": "batch" (Gemini batches through the Gemini emulator's Batch API). Reported per
image, from what Bunch recorded (`cost` of /api/jobs/{id}/status: Gemini tokens priced by lane,
RunPod execution seconds priced per worker-second) and from the RunPod emulator's own count of
worker busy seconds (what RunPod bills). The realtime lane's Gemini latency is --latency-ms plus a
lognormal draw of median --jitter-ms, as bench.worker_seconds uses; the batch lane's emulator batch
runs for --batch-seconds.

Targets (ratios from the same run): the batch lane's Gemini cost per image is half the realtime
lane's (0.5, within 2 %), and it uses no RunPod worker time at all.

    python -m bench.lanes [--inputs 250 --variations 4 --workers 8] [--no-record]
"""

import asyncio
import io
import time
import zipfile
from typing import Any

import aiohttp

from bench.common import AUTH, Report, bench_stack, parser, png_bytes
from deploy.stack import Stack

B = "10 lanes"
FINAL = {"completed", "failed", "canceled"}


async def emulator(http: aiohttp.ClientSession, url: str, path: str, body: Any = None) -> Any:
    async with http.request("GET" if body is None else "POST", f"{url}/_emulator/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def dataset(http: aiohttp.ClientSession, stack: Stack, count: int) -> str:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(count):
            archive.writestr(f"input-{i:04d}.png", png_bytes(seed=i + 1))
    form = aiohttp.FormData()
    form.add_field("files", out.getvalue(), filename="inputs.zip", content_type="application/zip")
    async with http.post(f"{stack.gateway_url}/api/datasets", data=form) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["id"])


async def run_job(http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], within: float) -> dict[str, Any]:
    began = time.monotonic()
    async with http.post(f"{stack.gateway_url}/api/jobs", json=body) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
    while True:
        async with http.get(f"{stack.gateway_url}/api/jobs/{job_id}/status") as resp:
            status = await resp.json()
        if status["status"] in FINAL:
            status["wall"] = time.monotonic() - began
            return dict(status)
        if time.monotonic() - began > within:
            raise TimeoutError(f"job not done within {within} s: {status}")
        await asyncio.sleep(0.5)


async def busy_seconds(http: aiohttp.ClientSession, stack: Stack) -> float:
    workers = await emulator(http, stack.runpod_url, "workers")
    return float(sum(worker.get("busy_seconds", 0.0) for worker in workers))


async def measure(stack: Stack, args: Any) -> dict[str, dict[str, Any]]:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        await emulator(http, stack.gemini_url, "config", {"latency_jitter_ms": args.jitter_ms})
        await emulator(http, stack.gemini_url, "config", {"batch_pending_seconds": 1.0})
        await emulator(http, stack.gemini_url, "config", {"batch_running_seconds": args.batch_seconds})
        dataset_id = await dataset(http, stack, args.inputs)
        body = {"mode": "automatic", "base_prompt": "a watercolor of this scene", "dataset_id": dataset_id}
        body["variations_per_image"] = args.variations
        results: dict[str, dict[str, Any]] = {}
        for lane in ("realtime", "batch"):
            before = await busy_seconds(http, stack)
            status = await run_job(http, stack, {**body, "lane": lane}, args.timeout)
            status["busy"] = await busy_seconds(http, stack) - before
            results[lane] = status
        return results


async def main_async(args: Any) -> int:
    report = Report(args)
    env = {
        "BUNCH_MAX_CONCURRENCY": str(args.workers),
        "BUNCH_BATCH_POLL_SECONDS": "1",
        "BUNCH_BATCH_POLL_MAX_SECONDS": "2",
    }
    with bench_stack(
        "lanes",
        runpod_workers=args.workers,
        service_env=env,
        gemini_args=("--latency-ms", str(args.latency_ms)),
        worker_env={"WORKER_CONCURRENCY": str(args.concurrency)},
        keep=args.keep,
    ) as stack:
        results = await measure(stack, args)
    images = args.inputs * args.variations
    per_image: dict[str, dict[str, float]] = {}
    for lane, status in results.items():
        done = status["progress"]["images_succeeded"]
        cost = status["cost"]
        report.add(B, f"{lane}: images succeeded / asked", f"{done} / {images}", f"{images}", done == images)
        per_image[lane] = {
            "gemini": cost["gemini_usd"] / max(1, done),
            "runpod": cost["runpod_usd"] / max(1, done),
            "total": cost["total_usd"] / max(1, done),
            "recorded_seconds": cost["runpod_seconds"] / max(1, done),
            "busy_seconds": status["busy"] / max(1, done),
        }
        figures = per_image[lane]
        report.add(B, f"{lane}: Gemini cost per image (recorded)", f"${figures['gemini']:.5f}")
        report.add(B, f"{lane}: RunPod cost per image (recorded)", f"${figures['runpod']:.5f}")
        report.add(B, f"{lane}: total cost per image", f"${figures['total']:.5f}")
        report.add(B, f"{lane}: RunPod execution seconds per image (recorded)", f"{figures['recorded_seconds']:.3f} s")
        report.add(B, f"{lane}: RunPod worker busy seconds per image (emulator)", f"{figures['busy_seconds']:.3f} s")
        report.add(B, f"{lane}: wall time", f"{status['wall']:.1f} s")
    ratio = per_image["batch"]["gemini"] / per_image["realtime"]["gemini"] if per_image["realtime"]["gemini"] else 0.0
    report.add(B, "batch / realtime Gemini cost per image", f"{ratio:.3f}", "0.50 ± 2 %", abs(ratio - 0.5) <= 0.01)
    batch_busy = per_image["batch"]["busy_seconds"] + per_image["batch"]["recorded_seconds"]
    realtime_busy = per_image["realtime"]["busy_seconds"] + per_image["realtime"]["recorded_seconds"]
    report.add(
        B,
        "batch / realtime RunPod worker-seconds per image",
        f"{batch_busy / realtime_busy if realtime_busy else float('nan'):.3f} ({batch_busy:.3f} s)",
        "0",
        batch_busy == 0,
    )
    saving = 1 - per_image["batch"]["total"] / per_image["realtime"]["total"] if per_image["realtime"]["total"] else 0.0
    report.add(B, "batch lane saving on the total", f"{saving * 100:.1f} %")
    report.note(
        B,
        f"""One automatic job of {args.inputs} inputs x {args.variations} variations in each lane, one after
the other on one stack. Realtime: {args.workers} runs in flight, worker concurrency {args.concurrency}, Gemini
latency {args.latency_ms} ms + lognormal(median {args.jitter_ms} ms). Batch: the emulator's batches pend 1 s
and run {args.batch_seconds} s. Prices are the settings' table (shared/pricing.py) and
BUNCH_RUNPOD_PRICE_PER_SECOND_USD; wall times compare the emulators, not Google's batch turnaround (up to 24 h).""",
    )
    return report.finish([B])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--inputs", type=int, default=250)
    p.add_argument("--variations", type=int, default=4)
    p.add_argument("--workers", type=int, default=8, help="runs in flight = BUNCH_MAX_CONCURRENCY")
    p.add_argument("--concurrency", type=int, default=4, help="the workers' concurrency_modifier")
    p.add_argument("--latency-ms", type=int, default=500)
    p.add_argument("--jitter-ms", type=int, default=1000)
    p.add_argument("--batch-seconds", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=1800.0)
    raise SystemExit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
