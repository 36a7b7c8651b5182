"""Benchmark 6: images per second through the whole pipeline, and where the time goes.

The default stack with the real worker handler and the Gemini emulator at 0 latency (it still draws
and encodes a real PNG per image). --jobs semi_auto jobs with one uploaded reference make --images
images in total; the clock runs from the first submit to the last job completed (ZIP ready).
Pass 1 is timed and reads every process's CPU from /proc; pass 2 repeats the workload with py-spy
recording every Python process of the stack, and summarizes the samples.

    python -m bench.e2e [--images 400 --jobs 4 --workers 8] [--no-profile]
"""

import asyncio
import collections
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench.common import AUTH, Report, bench_stack, cpu_seconds, fmt_s, parser, pid_of, png_bytes, wait_idle
from deploy.stack import Stack
from shared import keys

B6 = "6 end to end"
PY_SPY = Path(sys.executable).with_name("py-spy")
HAVE_PY_SPY = PY_SPY.exists()
PROJECT_FRAME = re.compile(r"\((services|shared|deploy)/|\((handler|gemini_client)\.py:")
FINAL_JOB = {"completed", "failed", "canceled"}
# Leaf frames of threads that wait rather than work (py-spy's idle detection misses some).
IDLE_LEAVES = re.compile(
    r"^(wait|Condition\.wait|Queue\.get|_worker|select|EpollSelector\.select|PollSelector\.select|sleep|accept|"
    r"_wait_for_tstate_lock|Runner\.run|BaseEventLoop\.run_forever)$"
)


async def run_workload(stack: Stack, args: Any, ref: str, tag: str) -> dict[str, Any]:
    per_job = args.images // args.jobs
    body = {"mode": "semi_auto", "group": f"e2e-{tag}", "prompts": ["a red fox in snow"]}
    body |= {"reference_ids": [ref], "images_per_prompt": per_job}
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as api:
            t0 = time.time()
            ids = []
            for _ in range(args.jobs):
                async with api.post(f"{stack.gateway_url}/api/jobs", json=body) as resp:
                    assert resp.status == 202, await resp.text()
                    ids.append((await resp.json())["id"])
            deadline = time.monotonic() + args.timeout
            while True:
                async with redis.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hmget(keys.job(job_id), ["status", "completed_at", "images_succeeded", "images_failed"])
                    rows = await pipe.execute()
                if all(row[0] in FINAL_JOB for row in rows):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"jobs not final: {rows}\n{stack.logs()}")
                await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as plain:
            async with plain.get(f"{stack.runpod_url}/_emulator/jobs") as resp:
                runs = [r for r in await resp.json() if r["input"]["job_id"] in ids and r["finished_at"]]
    finally:
        await redis.aclose()
    return {
        "wall": max(float(row[1]) for row in rows) - t0,
        "generation": max(r["finished_at"] for r in runs) - t0,
        "succeeded": sum(int(row[2] or 0) for row in rows),
        "failed": sum(int(row[3] or 0) for row in rows),
        "statuses": sorted({row[0] for row in rows}),
        "runs": len(runs),
        "run_seconds": sorted(r["finished_at"] - r["started_at"] for r in runs),
    }


def spawn(cmd: list[str]) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def python_processes(stack: Stack) -> dict[str, int]:
    names = {
        "gateway": "gateway-0",
        "dispatcher": "dispatcher-0",
        "packager": "packager-0",
        "RunPod emulator + handler": "runpod",
        "Gemini emulator": "gemini",
        "S3 (moto)": "s3",
    }
    return {label: pid_of(stack, name) for label, name in names.items()}


def summarize(raw: Path, top: int = 6) -> list[str]:
    """Self time by package and the hottest project functions, from py-spy's raw (collapsed) output."""
    by_package: collections.Counter[str] = collections.Counter()
    project: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if IDLE_LEAVES.match(frames[-1].split(" (", 1)[0]):
            continue
        n = int(count)
        total += n
        by_package[_package(frames[-1])] += n
        # The innermost frame of our own code is what a change in the project would touch.
        for frame in reversed(frames):
            function = frame.split(" (", 1)[0]
            if PROJECT_FRAME.search(frame) and function not in ("main", "<module>"):
                if function.endswith("Middleware.__call__"):
                    # A pass-through ASGI middleware: what is under it is the web framework's work.
                    frame = "(FastAPI/Starlette under the app's middleware)"
                project[re.sub(r":\d+\)$", ")", frame)] += n
                break
        else:
            project["(no project frame: libraries, event loop)"] += n
    if total == 0:
        return ["no busy samples"]
    out = [
        f"{total} busy samples; self time by package: "
        + ", ".join(f"{p} {n / total:.0%}" for p, n in by_package.most_common(top))
    ]
    out.append(
        "innermost project frames: "
        + ", ".join(f"`{f.split(' (')[0]}` {n / total:.0%}" for f, n in project.most_common(top))
    )
    return out


def _package(frame: str) -> str:
    """py-spy names files relative to their sys.path entry: 'aiohttp/web.py', 'threading.py' ..."""
    match = re.search(r"\((.*?):\d+\)$", frame)
    path = match.group(1) if match else frame
    if path.startswith("<"):
        return "interpreter"
    parts = path.split("/")
    if parts[0] in ("services", "shared", "deploy", "bench") and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


async def main_async(args: Any) -> int:
    report = Report(args)
    env = {"BUNCH_MAX_CONCURRENCY": str(args.workers)}
    print(f"e2e: {args.images} images in {args.jobs} jobs, C = {args.workers}, Gemini latency 0", flush=True)
    with bench_stack(
        "e2e", runpod_workers=args.workers, service_env=env, gemini_args=("--latency-ms", "0"), keep=args.keep
    ) as stack:
        procs = python_processes(stack)
        procs["redis-server"] = pid_of(stack, "redis")
        await asyncio.to_thread(wait_idle, list(procs.values()))
        async with aiohttp.ClientSession(headers=AUTH) as api:
            form = aiohttp.FormData()
            form.add_field("files", png_bytes(7, 64), filename="ref.png", content_type="image/png")
            async with api.post(f"{stack.gateway_url}/api/uploads", data=form) as resp:
                assert resp.status == 201, await resp.text()
                ref = (await resp.json())["uploads"][0]["id"]
        # A small warm-up so imports and first connections are not on the clock.
        warm = type(args)(**{**vars(args), "images": 8, "jobs": 1})
        await run_workload(stack, warm, ref, "warm")
        cpu0 = {name: cpu_seconds(pid) for name, pid in procs.items()}
        result = await run_workload(stack, args, ref, "timed")
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in procs.items()}

        profiles: dict[str, list[str]] = {}
        spy = str(PY_SPY)
        if args.profile and not HAVE_PY_SPY:
            print("py-spy is not installed (`.venv/bin/pip install py-spy`): no profile", flush=True)
        elif args.profile:
            recorders = {}
            for name, pid in python_processes(stack).items():
                out = stack.workdir / f"profile-{pid}.txt"
                cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(args.rate)]
                cmd += ["--nonblocking", "--output", str(out)]
                recorders[name] = (spawn(cmd), out)
            await asyncio.sleep(1.0)
            profiled = await run_workload(stack, args, ref, "profiled")
            for name, (proc, out) in recorders.items():
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
                profiles[name] = summarize(out) if out.exists() else [f"py-spy failed: {err.decode()[-300:]}"]
            print(f"    profiled pass: {profiled['wall']:.2f} s (py-spy at {args.rate} Hz slows it)", flush=True)

    wall = result["wall"]
    images = result["succeeded"]
    report.add(B6, f"images/s, {args.images} images, first submit → last ZIP", f"{images / wall:.1f}")
    report.add(B6, "wall time (to last run finished / to last ZIP)", f"{fmt_s(result['generation'])} / {fmt_s(wall)}")
    report.add(B6, "images succeeded / failed", f"{images} / {result['failed']}", f"{args.images} / 0",
               images == args.images)  # fmt: skip
    total_cpu = sum(cpu.values())
    report.add(B6, "CPU of the stack / wall", f"{total_cpu / wall:.2f} cores of 2")
    runs = result["run_seconds"]
    cpu_lines = ", ".join(f"{name} {used:.1f} s ({used / total_cpu:.0%})" for name, used in cpu.items())
    profile_lines = "\n".join(
        f"- **{name}** ({cpu[name]:.1f} CPU s in pass 1): " + "; ".join(lines) for name, lines in profiles.items()
    )
    report.note(
        B6,
        f"""Default stack (real worker handler in the RunPod emulator, C = {args.workers} workers and
BUNCH_MAX_CONCURRENCY={args.workers}; Gemini emulator `--latency-ms 0`, which still draws and PNG-encodes a
256 px image per call). {args.jobs} semi_auto jobs of {args.images // args.jobs} images with one uploaded
reference; {result["runs"]} runs, run time on RunPod median {runs[len(runs) // 2] * 1000:.0f} ms (min
{runs[0] * 1000:.0f}, max {runs[-1] * 1000:.0f}). Jobs ended {result["statuses"]}.

Where the CPU went in the timed pass ({total_cpu:.1f} CPU s in {wall:.1f} s on 2 cores, from /proc):
{cpu_lines}.

py-spy (`py-spy record --format raw --rate {args.rate} --nonblocking`, a second identical pass; samples
of threads that only wait are dropped, and so are samples in uvloop's C loop (`Runner.run` as the leaf),
mostly epoll waits; "self time by package" is the leaf frame's package, "innermost project
frames" the deepest frame of the project's own code in each sample):
{profile_lines or "(not profiled: --no-profile)"}""",
    )
    return report.finish([B6])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--workers", type=int, default=8, help="RunPod workers = BUNCH_MAX_CONCURRENCY")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--no-profile", dest="profile", action="store_false")
    args = p.parse_args()
    if args.images % args.jobs:
        p.error("--images must be a multiple of --jobs")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
