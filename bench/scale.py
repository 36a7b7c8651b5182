"""Benchmark 5: an automatic job of 10,000 input images: accept time, Redis memory per queued run,
status latency.

The whole stack runs; the project is paused first (POST /api/queue/pause) so no run starts. A few
distinct tiny PNGs are uploaded and repeated to make 10,000 input ids (one variation each: 10,000
images, 2,500 runs per job). Redis INFO memory used_memory before and after --jobs such jobs.

    python -m bench.scale [--inputs 10000 --jobs 3 --status-calls 50]
"""

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench.common import (
    AUTH,
    Report,
    bench_stack,
    fmt_ms,
    fmt_s,
    median,
    parser,
    percentile,
    pid_of,
    png_bytes,
    wait_idle,
)
from shared import keys
from shared.settings import Settings
from shared.stores.jobs import JobStore

B5 = "5 scale"
JSON = {"content-type": "application/json"}


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def main_async(args: Any) -> int:
    report = Report(args)
    print(f"scale: {args.jobs} automatic jobs of {args.inputs} inputs, project paused", flush=True)
    with bench_stack("scale", keep=args.keep) as stack:
        redis = Redis.from_url(stack.redis_url, decode_responses=True)
        wait_idle([pid_of(stack, n) for n in ("gateway-0", "dispatcher-0", "packager-0")])
        async with aiohttp.ClientSession(headers=AUTH) as api:
            async with api.post(f"{stack.gateway_url}/api/queue/pause") as resp:
                assert resp.status == 200, await resp.text()
            form = aiohttp.FormData()
            for i in range(args.distinct):
                form.add_field("files", png_bytes(i), filename=f"in{i}.png", content_type="image/png")
            async with api.post(f"{stack.gateway_url}/api/uploads", data=form) as resp:
                assert resp.status == 201, await resp.text()
                uploads = [u["id"] for u in (await resp.json())["uploads"]]
            body = {
                "mode": "automatic",
                "group": "bench-scale",
                "base_prompt": "the same scene at dusk",
                "input_ids": [uploads[i % len(uploads)] for i in range(args.inputs)],
                "variations_per_image": 1,
            }
            raw = json.dumps(body).encode()
            await asyncio.sleep(1.0)
            before = await used_memory(redis)
            accept_times, job_ids = [], []
            for _ in range(args.jobs):
                started = time.perf_counter()
                async with api.post(f"{stack.gateway_url}/api/jobs", data=raw, headers=JSON) as resp:
                    answer = await resp.json()
                    assert resp.status == 202, answer
                accept_times.append(time.perf_counter() - started)
                job_ids.append(answer["id"])
            after = await used_memory(redis)
            job = await redis.hmget(keys.job(job_ids[0]), ["runs_total", "images_total"])
            runs_total, images_total = int(job[0]), int(job[1])
            config_bytes = int(await redis.hstrlen(keys.job(job_ids[0]), "config"))
            job_key_bytes = int(await redis.memory_usage(keys.job(job_ids[0])) or 0)
            async with aiohttp.ClientSession() as plain:
                async with plain.get(f"{stack.runpod_url}/_emulator/stats") as resp:
                    received = (await resp.json())["runs_received"]

            status_times: list[float] = []
            status: dict[str, Any] = {}
            for _ in range(args.status_calls):
                started = time.perf_counter()
                async with api.get(f"{stack.gateway_url}/api/jobs/{job_ids[-1]}/status") as resp:
                    status = await resp.json()
                    assert resp.status == 200, status
                status_times.append(time.perf_counter() - started)

        # What a run result costs the dispatcher for this job: ResultHandler._completed (and the
        # poller path) reads the config with JobStore.config, uncached, once per run.
        store = JobStore(redis, Settings(redis_url=stack.redis_url))
        parse_times = []
        for _ in range(10):
            started = time.perf_counter()
            await store.config(job_ids[0])
            parse_times.append(time.perf_counter() - started)
        await redis.aclose()

    per_run = (after - before) / (args.jobs * runs_total)
    accept = max(accept_times)
    report.add(B5, f"accept a {args.inputs}-input job (slowest of {args.jobs})", fmt_s(accept), "< 3 s", accept < 3)
    report.add(B5, "Redis memory per queued run", f"{per_run:.0f} B", "< 1 KB", per_run < 1024)
    status_median = median(status_times)
    report.add(
        B5,
        f"status of a {images_total}-image job (median of {args.status_calls})",
        fmt_ms(status_median),
        "< 20 ms",
        status_median < 0.02,
    )
    report.add(B5, "status p90", fmt_ms(percentile(status_times, 0.9)))
    report.add(B5, "JobStore.config() of that job (per run result)", fmt_ms(median(parse_times)))
    report.note(
        B5,
        f"""{args.jobs} automatic jobs of {args.inputs} input ids ({args.distinct} distinct uploads repeated),
1 variation each: {images_total} images, {runs_total} runs per job, submitted one after another to a
paused project (runs received by RunPod meanwhile: {received}). Accept times
{", ".join(f"{t:.3f}" for t in accept_times)} s (request body {len(raw) / 1024:.0f} KB). Redis used_memory
{before / 1e6:.2f} MB before, {after / 1e6:.2f} MB after: {(after - before) / args.jobs / 1024:.0f} KB per job;
MEMORY USAGE of the job hash {job_key_bytes / 1024:.0f} KB ({job_key_bytes / runs_total:.0f} B per run),
of which the config JSON is {config_bytes / 1024:.0f} KB; nothing per run is stored before it starts.
Status (sequential calls, job queued behind the others): median {status_median * 1000:.1f} ms,
p90 {percentile(status_times, 0.9) * 1000:.1f} ms, max {max(status_times) * 1000:.1f} ms, queue_position
{status.get("queue_position")}. JobStore.config() on this job (HGET + pydantic validate_json of the
{config_bytes / 1024:.0f} KB config) takes {median(parse_times) * 1000:.1f} ms: the dispatcher's ConfigCache
spares it when starting runs, but services/dispatcher/results.py ResultHandler._completed and _failed
call store.config() uncached for every run result, i.e. {runs_total} parses per such job.""",
    )
    return report.finish([B5])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--distinct", type=int, default=4, help="distinct uploads the input ids repeat")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--status-calls", type=int, default=50)
    sys.exit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
