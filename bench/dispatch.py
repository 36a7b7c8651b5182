"""Benchmarks 1 and 2: dispatch efficiency against the physical limit, and what a run costs in CPU.

RunPod emulator with C workers whose runs only sleep T ms (`--sleep-ms`), Bunch with
BUNCH_MAX_CONCURRENCY = C, N runs across J semi_auto jobs (4 images a run, no references).
Ideal makespan = N * T / C; utilization = ideal / measured (first submit -> last run finished on
the emulator, from its /_emulator/jobs timestamps). Side by side, on the same emulator:
  (a) a plain arq worker with max_jobs = C that POSTs /run and polls /status (bench/arq_worker.py)
  (b) every run POSTed straight into the emulator's own queue at once.
Benchmark 2 reads utime+stime of the dispatcher, gateway and redis-server from /proc/<pid>/stat
before the first submit and after the last job is final.

    python -m bench.dispatch [--runs 2000 --jobs 20 --workers 50 --sleep-ms 200]
"""

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from arq import create_pool
from arq.connections import RedisSettings
from redis.asyncio import Redis

from bench import arq_worker, e2e
from bench.common import (
    AUTH,
    Report,
    bench_stack,
    cpu_seconds,
    fmt_ms,
    fmt_pct,
    fmt_s,
    median,
    parser,
    percentile,
    pid_of,
    wait_idle,
)
from deploy.processes import Process, base_env, python
from deploy.stack import Stack
from shared import keys
from shared.models import RunInput, WorkItem
from shared.settings import Settings
from shared.storage import Storage

B1 = "1 dispatch efficiency"
B2 = "2 dispatcher CPU"
FINAL_JOB = {"completed", "failed", "canceled"}
EMULATOR_HEADERS = {"Authorization": "Bearer emulator-key"}


@dataclass
class Timeline:
    """What the emulator saw of one phase: every run's received / started / finished time."""

    runs: int
    makespan: float  # first submit -> last run finished
    first_start: float  # first submit -> first run started
    busy: float  # sum of run execution times
    refill: list[float]  # a slot freed -> the next run started in it (per freed slot)
    react: list[float]  # a slot freed -> the next run *received* by RunPod (the dispatcher's path)
    max_in_progress: int

    def utilization(self, ideal: float) -> float:
        return ideal / self.makespan


async def emulator_get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def wait_runs(session: aiohttp.ClientSession, runpod_url: str, n: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        stats = await emulator_get(session, f"{runpod_url}/_emulator/stats")
        if stats["completed"] + stats["failed"] + stats["timed_out"] >= n:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only {stats} after {within}s")


async def timeline(session: aiohttp.ClientSession, runpod_url: str, t0: float, workers: int) -> Timeline:
    jobs = await emulator_get(session, f"{runpod_url}/_emulator/jobs")
    stats = await emulator_get(session, f"{runpod_url}/_emulator/stats")
    done = [j for j in jobs if j["finished_at"] is not None and j["started_at"] is not None]
    received = sorted(j["received_at"] for j in done)
    started = sorted(j["started_at"] for j in done)
    finished = sorted(j["finished_at"] for j in done)
    n = len(done)
    # The (i + C)-th run to start took the slot the i-th run to finish gave back.
    refill = [started[i + workers] - finished[i] for i in range(max(0, n - workers))]
    react = [received[i + workers] - finished[i] for i in range(max(0, n - workers))]
    return Timeline(
        runs=n,
        makespan=finished[-1] - t0,
        first_start=started[0] - t0,
        busy=sum(j["finished_at"] - j["started_at"] for j in done),
        refill=refill,
        react=react,
        max_in_progress=int(stats["max_in_progress"]),
    )


def run_payload(storage: Storage, n: int) -> dict[str, Any]:
    """A run input shaped like Bunch's (4 items with presigned output links) for the baselines."""
    items = [
        WorkItem(index=i, prompt="bench", reference_urls=[], output_url=storage.presigned_put(f"bench/{n}/{i}.png"))
        for i in range(4)
    ]
    run = RunInput(
        task="semi_auto_generation", job_id="bench", run_id=f"bench.{n}", attempt=1, model="m", params={}, items=items
    )
    return run.model_dump(mode="json")


# ------------------------------------------------------------------------------------ Bunch


async def bunch_phase(stack: Stack, args: Any, report: Report) -> tuple[Timeline, float]:
    runs_per_job = args.runs // args.jobs
    body = {"mode": "semi_auto", "group": "bench", "prompts": ["bench"], "images_per_prompt": runs_per_job * 4}
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    pids = {
        "dispatcher": pid_of(stack, "dispatcher-0"),
        "gateway": pid_of(stack, "gateway-0"),
        "redis-server": pid_of(stack, "redis"),
        "packager": pid_of(stack, "packager-0"),
        "RunPod emulator": pid_of(stack, "runpod"),
    }
    await asyncio.to_thread(wait_idle, list(pids.values()))
    recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    if args.profile:
        # Opt-in: py-spy costs CPU on these 2 cores, so the figures of a profiled run are not quoted.
        for name in ("dispatcher", "gateway"):
            out = stack.workdir / f"profile-{name}.txt"
            cmd = [str(e2e.PY_SPY), "record", "--pid", str(pids[name]), "--format", "raw", "--rate", "100"]
            recorders[name] = (e2e.spawn([*cmd, "--nonblocking", "--output", str(out)]), out)
        await asyncio.sleep(1.0)
    async with aiohttp.ClientSession(headers=AUTH) as api, aiohttp.ClientSession() as plain:
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.time()

        async def submit() -> str:
            async with api.post(f"{stack.gateway_url}/api/jobs", json=body) as resp:
                assert resp.status == 202, await resp.text()
                return str((await resp.json())["id"])

        job_ids = await asyncio.gather(*(submit() for _ in range(args.jobs)))
        submitted = time.time() - t0
        await wait_runs(plain, stack.runpod_url, args.jobs * runs_per_job, args.timeout)
        deadline = time.monotonic() + args.timeout
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hmget(keys.job(job_id), ["status", "completed_at"])
                rows = await pipe.execute()
            if all(status in FINAL_JOB for status, _ in rows):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not final: {rows}\n{stack.logs()}")
            await asyncio.sleep(0.1)
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        profiles = []
        for name, (proc, out) in recorders.items():
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
            profiles.append(f"- py-spy, {name}: " + "; ".join(e2e.summarize(out, top=8)))
        line = await timeline(plain, stack.runpod_url, t0, args.workers)
    await redis.aclose()
    jobs_makespan = max(float(completed_at) for _, completed_at in rows) - t0
    statuses = sorted({status for status, _ in rows})
    n = line.runs
    report.add(B1, "Bunch: makespan to last run finished", fmt_s(line.makespan))
    report.add(B1, "Bunch: makespan to every job final", fmt_s(jobs_makespan))
    print(f"    submit of {args.jobs} jobs took {submitted:.3f} s; jobs ended {statuses}", flush=True)

    cpu = {name: cpu1[name] - cpu0[name] for name in pids}
    per_run = {name: used / n for name, used in cpu.items()}
    report.add(B2, "dispatcher CPU per run", fmt_ms(per_run["dispatcher"]), "≤ 1 ms", per_run["dispatcher"] <= 0.001)
    report.add(B2, "gateway CPU per run", fmt_ms(per_run["gateway"]))
    report.add(B2, "redis-server CPU per run", fmt_ms(per_run["redis-server"]))
    report.add(
        B2,
        "dispatcher + gateway + redis CPU per run",
        fmt_ms(per_run["dispatcher"] + per_run["gateway"] + per_run["redis-server"]),
    )
    report.add(B2, "packager CPU per run (for reference)", fmt_ms(per_run["packager"]))
    report.add(B2, "RunPod emulator CPU per run (for reference)", fmt_ms(per_run["RunPod emulator"]))
    wall = jobs_makespan
    profiled = ""
    if profiles:
        profiled = "\n".join(["", "Profiled run (`--profile`, py-spy at 100 Hz: figures above perturbed):", *profiles])
    report.note(
        B2,
        f"""CPU seconds over the whole Bunch phase of benchmark 1 ({n} runs, {wall:.1f} s from the first
submit to the last job final), from utime+stime in /proc/<pid>/stat (10 ms ticks):
{", ".join(f"{name} {used:.2f} s ({used / wall * 100:.0f} % of a core)" for name, used in cpu.items())}.
Per run the dispatcher makes about four Redis round trips and one HTTP call: a claim call (Lua
RECORD_STARTED_AND_CLAIM: it records the RunPod ids of the runs started since the last call, then claims up to 16
runs), presigns 4 PUT links (shared/presign.py), POSTs /run, reads the webhook's task-result
message (XREADGROUP, carrying the XACK of the previous batch), builds 4 ImageRecords and
runs the COMPLETE_RUN Lua; it logs one JSON line per run. The gateway verifies the webhook token and
XADDs. On this VM one Redis round trip costs the client 60-100 µs of CPU (a raw asyncio PING
60 µs, redis-py's 85-100 µs): round trips, not Python code, are most of the cost.
{profiled}""",
    )
    return line, jobs_makespan


# ------------------------------------------------------------------------------------ baselines


async def direct_phase(stack: Stack, args: Any, storage: Storage) -> Timeline:
    """(b) every run POSTed to the emulator's queue at once (50 connections), then wait."""
    payloads = [run_payload(storage, n) for n in range(args.runs)]
    connector = aiohttp.TCPConnector(limit=args.workers)
    async with aiohttp.ClientSession(connector=connector, headers=EMULATOR_HEADERS) as session:
        await session.post(f"{stack.runpod_url}/_emulator/reset")
        t0 = time.time()

        async def post(payload: dict[str, Any]) -> None:
            async with session.post(f"{stack.runpod_url}/v2/local/run", json={"input": payload}) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(post(p) for p in payloads))
        await wait_runs(session, stack.runpod_url, args.runs, args.timeout)
        return await timeline(session, stack.runpod_url, t0, args.workers)


async def arq_phase(stack: Stack, args: Any, storage: Storage, poll_delay: float) -> tuple[Timeline, float, str]:
    """(a) a plain arq worker, max_jobs = C, one arq job per run, polling /status."""
    arq_redis = stack.redis_url.rsplit("/", 1)[0] + "/1"
    worker = Process(
        "arq-worker",
        python(
            "-m",
            "bench.arq_worker",
            "--redis",
            arq_redis,
            "--runpod",
            stack.runpod_url,
            "--max-jobs",
            str(args.workers),
            "--poll-ms",
            str(args.arq_poll_ms),
            "--poll-delay",
            str(poll_delay),
        ),
        base_env(),
        stack.workdir / "arq-worker.log",
    ).start()
    payloads = [run_payload(storage, n) for n in range(args.runs)]
    pool = await create_pool(RedisSettings.from_dsn(arq_redis))
    try:
        await pool.flushdb()
        async with aiohttp.ClientSession() as session:
            await session.post(f"{stack.runpod_url}/_emulator/reset")
            await asyncio.sleep(2.0)  # the worker is up and polling before the clock starts
            if not worker.alive:
                raise RuntimeError(f"arq worker died:\n{worker.log_tail()}")
            assert worker.popen is not None
            pids = {"arq worker": worker.popen.pid, "emulator": pid_of(stack, "runpod")}
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.time()
            await asyncio.gather(*(pool.enqueue_job(arq_worker.FUNCTION, p) for p in payloads))
            await wait_runs(session, stack.runpod_url, args.runs, args.timeout)
            deadline = time.monotonic() + args.timeout
            while int(await pool.get(arq_worker.DONE_KEY) or 0) < args.runs:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"arq jobs not done\n{worker.log_tail()}")
                await asyncio.sleep(0.02)
            all_done = time.time() - t0
            cpu = ", ".join(f"{name} {cpu_seconds(pid) - cpu0[name]:.1f} CPU s" for name, pid in pids.items())
            return await timeline(session, stack.runpod_url, t0, args.workers), all_done, cpu
    finally:
        await pool.aclose()
        worker.stop()


# ------------------------------------------------------------------------------------ main


def describe(line: Timeline) -> str:
    refill = line.refill or [float("nan")]
    return (
        f"first run started {line.first_start * 1000:.0f} ms after the first submit; a freed slot got its next "
        f"run after median {median(refill) * 1000:.1f} ms, p90 {percentile(refill, 0.9) * 1000:.1f} ms, "
        f"mean {sum(refill) / len(refill) * 1000:.1f} ms; mean run {line.busy / line.runs * 1000:.1f} ms; "
        f"max in progress {line.max_in_progress}"
    )


async def main_async(args: Any) -> int:
    report = Report(args)
    ideal = args.runs * args.sleep_ms / 1000 / args.workers
    env = {"BUNCH_MAX_CONCURRENCY": str(args.workers), "BUNCH_DISPATCH_PREFETCH": str(args.prefetch)}
    env.update(item.split("=", 1) for item in args.env)
    print(f"dispatch: {args.runs} runs of {args.sleep_ms} ms on C={args.workers}, ideal {ideal:.2f} s", flush=True)
    with bench_stack("dispatch", sleep_runpod=(args.workers, args.sleep_ms), service_env=env, keep=args.keep) as stack:
        storage = Storage(Settings(s3_endpoint=stack.s3_url))
        bunch, bunch_jobs = await bunch_phase(stack, args, report)
        if args.bunch_only:
            print(f"  Bunch utilization {fmt_pct(bunch.utilization(ideal))}; {describe(bunch)}", flush=True)
            return 0
        for name in ("gateway-0", "dispatcher-0", "packager-0"):
            stack.processes[name].stop()  # idle services out of the baselines' way
        direct = await direct_phase(stack, args, storage)
        arq, arq_done, arq_cpu = await arq_phase(stack, args, storage, 0.5)
        tuned, tuned_done, tuned_cpu = await arq_phase(stack, args, storage, args.arq_poll_delay)

    u_bunch, u_arq, u_tuned, u_direct = (x.utilization(ideal) for x in (bunch, arq, tuned, direct))
    report.add(B1, "ideal makespan N*T/C", fmt_s(ideal))
    report.add(B1, "(a) arq default: makespan to last run finished", fmt_s(arq.makespan))
    report.add(B1, "(a') arq tuned: makespan to last run finished", fmt_s(tuned.makespan))
    report.add(B1, "(b) emulator queue: makespan to last run finished", fmt_s(direct.makespan))
    report.add(B1, "Bunch utilization (ideal / makespan)", fmt_pct(u_bunch), "≥ 97 %", u_bunch >= 0.97)
    report.add(B1, "(a) arq default utilization", fmt_pct(u_arq))
    report.add(B1, "(a') arq tuned utilization", fmt_pct(u_tuned))
    report.add(B1, "(b) emulator-queue utilization", fmt_pct(u_direct))
    report.add(B1, "Bunch / (a) arq default", f"{u_bunch / u_arq:.3f}", "≥ 1.000", u_bunch >= u_arq)
    report.add(B1, "Bunch / (a') arq tuned", f"{u_bunch / u_tuned:.3f}", "≥ 1.000", u_bunch >= u_tuned)
    report.add(B1, "Bunch / (b) emulator queue", f"{u_bunch / u_direct:.3f}")
    refill = bunch.refill or [0.0]
    report.add(B1, "Bunch: median slot refill (freed → next started)", fmt_ms(median(refill)))
    report.add(B1, "Bunch: max runs in progress on RunPod", str(bunch.max_in_progress), f"≤ {args.workers}",
               bunch.max_in_progress <= args.workers)  # fmt: skip
    report.note(
        B1,
        f"""Workload: {args.runs} runs of {args.sleep_ms} ms on C = {args.workers} emulator workers
(`deploy/emulators/runpod.py --sleep-ms {args.sleep_ms} --workers {args.workers}`),
{args.jobs} semi_auto jobs of {args.runs // args.jobs * 4} images ({args.runs // args.jobs} runs each),
BUNCH_MAX_CONCURRENCY={args.workers}, BUNCH_DISPATCH_PREFETCH={args.prefetch}.
The sleep handler returns `{{"images": []}}`, so every image ends
failed `missing_output` and every job ends `failed` (the packager finds no image): this benchmark
measures runs, not images.

- Bunch: {describe(bunch)}. Slot refill = emulator finished -> webhook -> gateway -> XADD ->
  dispatcher COMPLETE_RUN -> RECORD_STARTED_AND_CLAIM -> presign -> POST /run -> an emulator worker picks it up; of it,
  freed -> next *received* by RunPod: median {median(bunch.react or [0.0]) * 1000:.1f} ms. Every job
  final after {bunch_jobs:.2f} s.
- (a) arq 0.28 worker as a user would write it (bench/arq_worker.py): max_jobs={args.workers},
  defaults otherwise (poll_delay 0.5 s), each job POSTs /run then polls /status every
  {args.arq_poll_ms} ms (`--arq-poll-ms`), no webhooks: {describe(arq)}; every arq job done after
  {arq_done:.2f} s; {arq_cpu}. arq reads up to 250 queued ids per poll but stops at the first one it cannot
  start (job_counter >= max_jobs), so a freed slot waits for the next poll: up to poll_delay.
- (a') the same worker with poll_delay {args.arq_poll_delay} s (`--arq-poll-delay`), a tuned arq:
  {describe(tuned)}; every arq job done after {tuned_done:.2f} s;
  {tuned_cpu} (its /status polling costs CPU: on 2 shared cores that slows it down). The target is against (a);
  the row against (a') is the stricter comparison.
- (b) {args.runs} POST /run at once (50 connections), the emulator's own FIFO queue: {describe(direct)}.

Utilization uses makespan = first submit -> last run finished on the emulator (the
/_emulator/jobs timestamps); Bunch's figure to "every job final" adds the packager's verdict.""",
    )
    return report.finish([B1, B2])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--workers", type=int, default=50, help="RunPod concurrency C = BUNCH_MAX_CONCURRENCY")
    p.add_argument("--sleep-ms", type=int, default=200, help="run time T of the emulator's sleep handler")
    p.add_argument("--prefetch", type=int, default=10, help="BUNCH_DISPATCH_PREFETCH: runs queued at RunPod beyond C")
    p.add_argument("--arq-poll-ms", type=int, default=50, help="baselines (a): interval of their /status polls")
    p.add_argument("--arq-poll-delay", type=float, default=0.05, help="baseline (a'): arq's queue poll interval")
    p.add_argument("--timeout", type=float, default=300.0, help="per phase")
    p.add_argument("--profile", action="store_true", help="py-spy the dispatcher and gateway in the Bunch phase")
    p.add_argument("--env", action="append", default=[], help="BUNCH_NAME=value for the services (repeatable)")
    p.add_argument("--bunch-only", action="store_true", help="for development: the Bunch phase only, nothing recorded")
    args = p.parse_args()
    if args.runs % args.jobs:
        p.error("--runs must be a multiple of --jobs")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
