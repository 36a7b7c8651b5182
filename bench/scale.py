"""Benchmark 5: an automatic job of 10,000 input images: accept time, Redis memory per queued run,
status latency, each judged by its growth from a job of 1,000 inputs measured side by side.

The whole stack runs; the project is paused first (POST /api/queue/pause) so no run starts. A few
distinct tiny PNGs are uploaded and repeated to make 10,000 input ids (one variation each: 10,000
images, 2,500 runs per job). Redis INFO memory used_memory before and after --jobs such jobs.

    python -m bench.scale [--inputs 10000 --small-inputs 1000 --jobs 3 --status-calls 50]
"""

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
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


@dataclass
class Side:
    """The jobs of one size: what accepting and holding them cost."""

    job_ids: list[str]
    accept_times: list[float]
    memory_growth: int
    runs_total: int
    images_total: int
    config_bytes: int
    job_key_bytes: int
    body_bytes: int
    status_times: list[float] = field(default_factory=list)

    @property
    def accept(self) -> float:
        return max(self.accept_times)

    @property
    def per_run(self) -> float:
        return self.memory_growth / (len(self.job_ids) * self.runs_total)

    def describe_accept(self) -> str:
        return ", ".join(f"{t:.3f}" for t in self.accept_times)


async def submit_jobs(
    api: aiohttp.ClientSession, redis: Redis, gateway_url: str, uploads: list[str], inputs: int, jobs: int
) -> Side:
    body = {
        "mode": "automatic",
        "group": "bench-scale",
        "base_prompt": "the same scene at dusk",
        "input_ids": [uploads[i % len(uploads)] for i in range(inputs)],
        "variations_per_image": 1,
    }
    raw = json.dumps(body).encode()
    before = await used_memory(redis)
    accept_times, job_ids = [], []
    for _ in range(jobs):
        started = time.perf_counter()
        async with api.post(f"{gateway_url}/api/jobs", data=raw, headers=JSON) as resp:
            answer = await resp.json()
            assert resp.status == 202, answer
        accept_times.append(time.perf_counter() - started)
        job_ids.append(answer["id"])
    after = await used_memory(redis)
    runs_total, images_total = map(int, await redis.hmget(keys.job(job_ids[0]), ["runs_total", "images_total"]))
    return Side(
        job_ids=job_ids,
        accept_times=accept_times,
        memory_growth=after - before,
        runs_total=runs_total,
        images_total=images_total,
        config_bytes=int(await redis.hstrlen(keys.job(job_ids[0]), "config")),
        job_key_bytes=int(await redis.memory_usage(keys.job(job_ids[0])) or 0),
        body_bytes=len(raw),
    )


async def main_async(args: Any) -> int:
    report = Report(args)
    print(f"scale: {args.jobs} automatic jobs of {args.small_inputs}, then of {args.inputs} inputs, paused", flush=True)
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
            # One job first, not counted: the project's and the group's first job creates their records.
            await submit_jobs(api, redis, stack.gateway_url, uploads, args.small_inputs, 1)
            await asyncio.sleep(1.0)
            # The baseline: the same measurements on a job a tenth the size, side by side, so what
            # is judged is how the costs grow with the job, not how fast this CPU is.
            small = await submit_jobs(api, redis, stack.gateway_url, uploads, args.small_inputs, args.jobs)
            large = await submit_jobs(api, redis, stack.gateway_url, uploads, args.inputs, args.jobs)
            async with aiohttp.ClientSession() as plain:
                async with plain.get(f"{stack.runpod_url}/_emulator/stats") as resp:
                    received = (await resp.json())["runs_received"]
            status: dict[str, Any] = {}
            for _ in range(args.status_calls):
                for side in (small, large):  # alternated, so other load weighs on both alike
                    started = time.perf_counter()
                    async with api.get(f"{stack.gateway_url}/api/jobs/{side.job_ids[-1]}/status") as resp:
                        status = await resp.json()
                        assert resp.status == 200, status
                    side.status_times.append(time.perf_counter() - started)

        # What a run result costs the dispatcher for this job: ResultHandler._completed (and the
        # poller path) reads the config with JobStore.config, uncached, once per run.
        store = JobStore(redis, Settings(redis_url=stack.redis_url))
        parse_times = []
        for _ in range(10):
            started = time.perf_counter()
            await store.config(large.job_ids[0])
            parse_times.append(time.perf_counter() - started)
        await redis.aclose()

    report.add(B5, f"accept a {args.inputs:,}-input job (slowest of {args.jobs})", fmt_s(large.accept))
    report.add(B5, f"accept a {args.small_inputs:,}-input job (slowest of {args.jobs})", fmt_s(small.accept))
    accept_growth = (large.accept / args.inputs) / (small.accept / args.small_inputs)
    report.add(
        B5,
        f"accept time per input, {args.inputs:,} / {args.small_inputs:,} inputs",
        f"{accept_growth:.2f}",
        "≤ 1.5 (linear or better)",
        accept_growth <= 1.5,
    )
    report.add(B5, f"Redis memory per queued run, {args.inputs:,}-input job", f"{large.per_run:.0f} B")
    report.add(B5, f"Redis memory per queued run, {args.small_inputs:,}-input job", f"{small.per_run:.0f} B")
    memory_growth = large.per_run / small.per_run
    report.add(
        B5,
        f"Redis per queued run, {args.inputs:,} / {args.small_inputs:,} inputs",
        f"{memory_growth:.2f}",
        "≤ 1.1 (flat)",
        memory_growth <= 1.1,
    )
    for side in (large, small):
        report.add(
            B5,
            f"status of a {side.images_total:,}-image job (median / p90 of {args.status_calls})",
            f"{fmt_ms(median(side.status_times))} / {fmt_ms(percentile(side.status_times, 0.9))}",
        )
    status_growth = median(large.status_times) / median(small.status_times)
    report.add(
        B5,
        f"status median, {large.images_total:,} / {small.images_total:,}-image job",
        f"{status_growth:.2f}",
        "≤ 1.5 (flat)",
        status_growth <= 1.5,
    )
    report.add(B5, "JobStore.config() of that job (per run result)", fmt_ms(median(parse_times)))
    report.note(
        B5,
        f"""{args.jobs} automatic jobs of {args.small_inputs} input ids, then {args.jobs} of {args.inputs}
({args.distinct} distinct uploads repeated), 1 variation each: {small.images_total} and {large.images_total}
images ({small.runs_total} and {large.runs_total} runs) per job, submitted one after another to a paused
project (runs received by RunPod meanwhile: {received}). Accept times {small.describe_accept()} s and
{large.describe_accept()} s (request bodies {small.body_bytes / 1024:.0f} and {large.body_bytes / 1024:.0f} KB).
Redis used_memory grew {small.memory_growth / args.jobs / 1024:.0f} and {large.memory_growth / args.jobs / 1024:.0f}
KB per job; MEMORY USAGE of the large job's hash {large.job_key_bytes / 1024:.0f} KB
({large.job_key_bytes / large.runs_total:.0f} B per run), of which the config JSON is
{large.config_bytes / 1024:.0f} KB; nothing per run is stored before it starts. Status (sequential calls,
alternating between the last small and the last large job, each queued behind the others): the large
job's max {max(large.status_times) * 1000:.1f} ms, queue_position {status.get("queue_position")}.
Judged: the growth from the small job to the large one (per input, per run, per status call), so a
slower or faster CPU moves both sides alike. JobStore.config() on the large job (HGET + pydantic
validate_json of the {large.config_bytes / 1024:.0f} KB config) takes {median(parse_times) * 1000:.1f} ms:
the dispatcher's ConfigCache spares it when starting runs, but services/dispatcher/results.py
ResultHandler._completed and _failed call store.config() uncached for every run result, i.e.
{large.runs_total} parses per such job.""",
    )
    return report.finish([B5])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--inputs", type=int, default=10_000)
    p.add_argument("--small-inputs", type=int, default=1_000, help="the baseline job's inputs")
    p.add_argument("--distinct", type=int, default=4, help="distinct uploads the input ids repeat")
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--status-calls", type=int, default=50)
    sys.exit(asyncio.run(main_async(p.parse_args())))


if __name__ == "__main__":
    main()
