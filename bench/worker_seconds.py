"""What a generated image costs in paid RunPod worker time, against the least it could cost.

RunPod bills a worker for every second it holds at least one job. The whole stack runs as in
production: the RunPod emulator starts worker/handler.py under the real runpod SDK runtime
(`concurrency_modifier` = WORKER_CONCURRENCY runs per worker, batch pickup, the SDK's 1 s nap when
full), the dispatcher keeps BUNCH_MAX_CONCURRENCY runs in flight, and the Gemini emulator answers
each call after a realistic latency: `--latency-ms` fixed plus a lognormal draw of median
`--jitter-ms` (sigma 0.5, deploy/emulators/gemini/state.py jitter_ms); the defaults, 2 s + a median
of 4 s, give a mean near 6.5 s and a 95th percentile near 11 s, inside the 4-15 s that
gemini-2.5-flash-image typically takes.

Measured: the emulator's busy seconds per worker (time holding at least one job), summed, per
image. Bound: each run's four calls go out together, so a run lasts at least the slowest of four
draws; a worker holding `concurrency_modifier` runs at once can at best pack them back to back:
E[max of 4 draws] / (4 x concurrency_modifier) worker-seconds per image (the expectation by Monte
Carlo from the same distribution). The ratio is the price of everything else: dispatch and pickup
gaps, transfers, uneven packing at the end of a job.

    python -m bench.worker_seconds [--images 160 --workers 8 --concurrency 4] [--no-record]
"""

import asyncio
import math
import random
import time
from typing import Any

import aiohttp

from bench.common import AUTH, Report, bench_stack, parser
from deploy.emulators.gemini.state import jitter_ms
from deploy.stack import Stack

B = "9 worker seconds"
RUN_SIZE = 4
TARGET_RATIO = 1.5


def bound_per_image(latency_ms: int, jitter_scale_ms: int, concurrency: int, draws: int = 200_000) -> float:
    rng = random.Random(1)
    slowest = [
        max(latency_ms + jitter_ms(jitter_scale_ms, rng) for _ in range(RUN_SIZE)) for _ in range(draws // RUN_SIZE)
    ]
    return sum(slowest) / len(slowest) / 1000 / (RUN_SIZE * concurrency)


async def emulator(http: aiohttp.ClientSession, url: str, path: str, body: Any = None) -> Any:
    async with http.request("GET" if body is None else "POST", f"{url}/_emulator/{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def run(stack: Stack, args: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        await emulator(http, stack.gemini_url, "config", {"latency_jitter_ms": args.jitter_ms})
        await emulator(http, stack.runpod_url, "reset", {})
        prompts = [f"a lighthouse at dusk, take {n}" for n in range(args.images // RUN_SIZE)]
        began = time.monotonic()
        body = {"mode": "semi_auto", "prompts": prompts, "images_per_prompt": RUN_SIZE}
        async with http.post(f"{stack.gateway_url}/api/jobs", json=body) as resp:
            assert resp.status in (200, 201, 202), await resp.text()
            job_id = (await resp.json())["id"]
        while True:
            async with http.get(f"{stack.gateway_url}/api/jobs/{job_id}") as resp:
                status = await resp.json()
            if status["status"] in ("completed", "failed", "canceled"):
                break
            if time.monotonic() - began > args.timeout:
                raise TimeoutError(f"job not done within {args.timeout} s: {status}")
            await asyncio.sleep(0.5)
        wall = time.monotonic() - began
        workers = await emulator(http, stack.runpod_url, "workers")
    return {"wall": wall, "status": status, "busy": sum(w.get("busy_seconds", 0.0) for w in workers)}


async def main_async(args: Any) -> int:
    report = Report(args)
    env = {"BUNCH_MAX_CONCURRENCY": str(args.workers)}
    worker_env = {"WORKER_CONCURRENCY": str(args.concurrency)}
    with bench_stack(
        "worker-seconds",
        runpod_workers=args.workers,
        service_env=env,
        gemini_args=("--latency-ms", str(args.latency_ms)),
        worker_env=worker_env,
        keep=args.keep,
    ) as stack:
        result = await run(stack, args)
    progress = result["status"]["progress"]
    images = progress["images_succeeded"]
    measured = result["busy"] / max(1, images)
    bound = bound_per_image(args.latency_ms, args.jitter_ms, args.concurrency)
    ratio = measured / bound
    processes = math.ceil(args.workers / args.concurrency)
    report.add(B, "images succeeded / asked", f"{images} / {args.images}", f"{args.images}", images == args.images)
    report.add(B, "RunPod worker-seconds per image (measured)", f"{measured:.3f} s")
    report.add(B, "lower bound: E[slowest of 4 calls] / (4 x concurrency_modifier)", f"{bound:.3f} s")
    report.add(B, "measured / bound", f"{ratio:.2f}", f"<= {TARGET_RATIO}", ratio <= TARGET_RATIO)
    report.add(B, "wall time", f"{result['wall']:.1f} s")
    report.note(
        B,
        f"""{args.images} images in one semi-automatic job ({args.images // RUN_SIZE} runs of {RUN_SIZE});
{processes} worker process(es) of the real runpod SDK runtime with concurrency_modifier {args.concurrency}
({args.workers} runs at once = BUNCH_MAX_CONCURRENCY). Gemini latency per call: {args.latency_ms} ms +
lognormal(median {args.jitter_ms} ms, sigma 0.5). Worker busy time summed over workers: {result["busy"]:.1f} s.
The bound assumes perfect packing; the gap is dispatch and pickup (the SDK naps 1 s when a worker is full),
reference downloads and uploads, and the last runs of the job leaving workers part-empty.""",
    )
    return report.finish([B])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--workers", type=int, default=8, help="runs in flight = BUNCH_MAX_CONCURRENCY")
    p.add_argument("--concurrency", type=int, default=4, help="the workers' concurrency_modifier")
    p.add_argument("--latency-ms", type=int, default=2000)
    p.add_argument("--jitter-ms", type=int, default=4000)
    p.add_argument("--timeout", type=float, default=600.0)
    raise SystemExit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
