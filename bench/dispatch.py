"""Benchmarks 1 and 2: dispatch efficiency against the physical limit, and what a run costs in CPU.

RunPod emulator with C workers whose runs only sleep T ms (`--sleep-ms`), Bunch with
BUNCH_MAX_CONCURRENCY = C, N runs across J semi_auto jobs (4 images a run, no references).
Ideal makespan = N * T / C; utilization = ideal / measured (first submit -> last run finished on
the emulator, from its /_emulator/jobs timestamps). Side by side, on the same emulator, after the
Bunch phase with Bunch's services stopped:
  (f) the minimal dispatcher of benchmark 2 (bench/dispatch_floor.py, webhooks through
      bench/webhook_sink.py), on Redis db 2 of the same redis-server
  (b) every run POSTed straight into the emulator's own queue at once, with a webhook as Bunch's
  (a) a plain arq worker with max_jobs = C that POSTs /run and polls /status (bench/arq_worker.py)
  (a') the same with arq's queue poll interval tuned down.
Judged (ratios against baselines of the same run, so they hold on any CPU): Bunch's utilization
against (b) and (a'); max runs in progress / C; benchmark 2, the dispatcher's CPU per run (utime +
stime from /proc/<pid>/stat, first submit -> every job final) against (f)'s (its first POST -> its
last completion recorded). Absolute times and CPU figures are reported, not judged.

The workload stays within RunPod's /run limit (1,000 per 10 s, of which Bunch's dispatcher takes
90 %, services/dispatcher/runpod_limits.py): beyond it every dispatcher is bound by the limit, not by
how it dispatches. So C = 10 runs of 200 ms, 50 /run per s; `main` refuses a workload over it.

    python -m bench.dispatch [--runs 1000 --jobs 20 --workers 10 --sleep-ms 200]   # ~2.5 min
    python -m bench.dispatch --smoke --runs 40 --jobs 2 --workers 10 --sleep-ms 50   # every phase, ~12 s
"""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import default_queue_name, health_check_key_suffix
from redis.asyncio import Redis

from bench import arq_worker, dispatch_floor, e2e
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
from bench.dispatch_floor import run_payload
from deploy.processes import Process, base_env, free_port, python, wait_http
from deploy.stack import Stack
from services.dispatcher.runpod_limits import RUNPOD_LIMITS, WINDOW_SECONDS, RequestGate
from shared import keys
from shared.settings import Settings
from shared.storage import Storage

B1 = "1 dispatch efficiency"
B2 = "2 dispatcher CPU"
FINAL_JOB = {"completed", "failed", "canceled"}
EMULATOR_HEADERS = {"Authorization": "Bearer emulator-key"}
# Benchmark 2's target: the dispatcher's CPU per run at most this many times the minimal
# dispatcher's (bench/dispatch_floor.py), measured in the same run. Why this figure: the B2 note.
FLOOR_RATIO_MAX = 4.0
# /run calls per RunPod window that Bunch's dispatcher allows itself (services/dispatcher/runpod_limits.py).
RUN_BUDGET = RUNPOD_LIMITS["run"][0] * float(Settings.model_fields["runpod_limit_share"].default)


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


# ------------------------------------------------------------------------------------ Bunch


@dataclass
class BunchPhase:
    line: Timeline
    jobs_makespan: float  # first submit -> every job final
    cpu: dict[str, float]  # CPU seconds of each process over the phase
    profiles: list[str]  # py-spy summaries (--profile)


async def bunch_phase(stack: Stack, args: Any, report: Report) -> BunchPhase:
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
    if not args.smoke:  # smoke CPU figures are not quoted: no need to wait for start-up to settle
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
    report.add(B1, "Bunch: makespan to last run finished", fmt_s(line.makespan))
    report.add(B1, "Bunch: makespan to every job final", fmt_s(jobs_makespan))
    print(f"    submit of {args.jobs} jobs took {submitted:.3f} s; jobs ended {statuses}", flush=True)
    return BunchPhase(line, jobs_makespan, {name: cpu1[name] - cpu0[name] for name in pids}, profiles)


# ------------------------------------------------------------------------------------ baselines


@dataclass
class FloorPhase:
    line: Timeline
    cpu: dict[str, float]  # CPU seconds of each process over the phase
    counts: dict[str, int]  # what the minimal dispatcher did: reads, claim_calls, posts, completions


async def floor_phase(stack: Stack, args: Any) -> FloorPhase:
    """(f) the minimal dispatcher, its webhooks through a receiver of their own, on Redis db 2."""
    floor_url = stack.redis_url.rsplit("/", 1)[0] + "/2"  # the same redis-server, out of Bunch's keys
    redis = Redis.from_url(floor_url, decode_responses=True)
    await redis.flushdb()
    port = free_port()
    sink_url = f"http://127.0.0.1:{port}/webhook"
    sink_args = ["--redis", floor_url, "--port", str(port)]
    sink = Process(
        "webhook-sink", python("-m", "bench.webhook_sink", *sink_args), base_env(), stack.workdir / "webhook-sink.log"
    )
    floor_args = ["--redis", floor_url, "--runpod", stack.runpod_url, "--webhook", sink_url, "--s3", stack.s3_url]
    floor_args += ["--runs", str(args.runs), "--workers", str(args.workers), "--prefetch", str(args.prefetch)]
    floor = Process(
        "dispatch-floor",
        python("-m", "bench.dispatch_floor", *floor_args),
        base_env(),
        stack.workdir / "dispatch-floor.log",
    )
    try:
        sink.start()
        floor.start()
        await asyncio.to_thread(wait_http, sink_url, sink)  # a GET answers 405: it is up
        deadline = time.monotonic() + 60
        while not await redis.exists(dispatch_floor.READY_KEY):  # payloads built, queue filled
            if not floor.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the minimal dispatcher did not get ready:\n{floor.log_tail()}")
            await asyncio.sleep(0.02)
        assert floor.popen is not None and sink.popen is not None
        pids = {
            "minimal dispatcher": floor.popen.pid,
            "webhook sink": sink.popen.pid,
            "redis-server": pid_of(stack, "redis"),
            "RunPod emulator": pid_of(stack, "runpod"),
        }
        if not args.smoke:
            await asyncio.to_thread(wait_idle, list(pids.values()))
        async with aiohttp.ClientSession() as session:
            await session.post(f"{stack.runpod_url}/_emulator/reset")
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            t0 = time.time()
            await redis.lpush(dispatch_floor.GO_KEY, "go")
            deadline = time.monotonic() + args.timeout
            while (done := await redis.blpop([dispatch_floor.DONE_KEY], timeout=1)) is None:
                if not floor.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"the minimal dispatcher did not finish:\n{floor.log_tail()}")
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            line = await timeline(session, stack.runpod_url, t0, args.workers)
        counts = json.loads(done[1])
        print(f"    minimal dispatcher: {counts}; {cpu_text(cpu)}", flush=True)
        return FloorPhase(line, cpu, counts)
    finally:
        floor.stop()
        sink.stop()
        await redis.aclose()


@contextlib.asynccontextmanager
async def answering_webhooks() -> AsyncIterator[str]:
    """A receiver that answers every webhook 200 and keeps nothing: (b)'s webhooks cost the
    emulator what Bunch's cost it, so the two queues differ only in how runs reach them."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": True})

    app = web.Application()
    app.router.add_post("/webhook", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/webhook"
    finally:
        await runner.cleanup()


async def direct_phase(stack: Stack, args: Any, storage: Storage) -> Timeline:
    """(b) every run POSTed to the emulator's queue at once (C connections), as fast as RunPod's /run
    limit allows (beyond 1,000 runs it paces them), each with a webhook as Bunch's; then wait."""
    payloads = [run_payload(storage, n) for n in range(args.runs)]
    connector = aiohttp.TCPConnector(limit=args.workers)
    gate = RequestGate(*RUNPOD_LIMITS["run"])
    async with (
        answering_webhooks() as webhook,
        aiohttp.ClientSession(connector=connector, headers=EMULATOR_HEADERS) as session,
    ):
        await session.post(f"{stack.runpod_url}/_emulator/reset")
        t0 = time.time()

        async def post(payload: dict[str, Any]) -> None:
            body = {"input": payload, "webhook": webhook}
            async with gate.slot(), session.post(f"{stack.runpod_url}/v2/local/run", json=body) as resp:
                assert resp.status == 200, await resp.text()

        await asyncio.gather(*(post(p) for p in payloads))
        await wait_runs(session, stack.runpod_url, args.runs, args.timeout)
        return await timeline(session, stack.runpod_url, t0, args.workers)


async def arq_phase(
    stack: Stack, args: Any, storage: Storage, poll_delay: float
) -> tuple[Timeline, float, dict[str, float]]:
    """(a) a plain arq worker, max_jobs = C, one arq job per run, polling /status."""
    arq_redis = stack.redis_url.rsplit("/", 1)[0] + "/1"
    payloads = [run_payload(storage, n) for n in range(args.runs)]
    pool = await create_pool(RedisSettings.from_dsn(arq_redis))
    # Emptied before the worker starts: its first poll writes the health-check key waited for below.
    await pool.flushdb()
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
    try:
        async with aiohttp.ClientSession() as session:
            await session.post(f"{stack.runpod_url}/_emulator/reset")
            deadline = time.monotonic() + 60
            while not await pool.exists(default_queue_name + health_check_key_suffix):  # polling the queue
                if not worker.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"arq worker did not start:\n{worker.log_tail()}")
                await asyncio.sleep(0.02)
            assert worker.popen is not None
            pids = {"arq worker": worker.popen.pid, "emulator": pid_of(stack, "runpod")}
            if not args.smoke:
                await asyncio.to_thread(wait_idle, list(pids.values()))
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
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            return await timeline(session, stack.runpod_url, t0, args.workers), all_done, cpu
    finally:
        await pool.aclose()
        worker.stop()


# ------------------------------------------------------------------------------------ main


def cpu_text(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {used:.2f} CPU s" for name, used in cpu.items())


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
        bunch = await bunch_phase(stack, args, report)
        if args.bunch_only:
            used = bunch.cpu["dispatcher"] / bunch.line.runs
            print(f"  Bunch utilization {fmt_pct(bunch.line.utilization(ideal))}; {describe(bunch.line)}", flush=True)
            print(f"  dispatcher CPU per run {fmt_ms(used)}", flush=True)
            return 0
        # Out of the baselines' way; stopped side by side, each takes a while to shut down.
        services = [stack.processes[name] for name in ("gateway-0", "dispatcher-0", "packager-0")]
        for service in services:
            service.signal(signal.SIGTERM)
        for service in services:
            service.wait()
        floor = await floor_phase(stack, args)
        direct = await direct_phase(stack, args, storage)
        arq, arq_done, arq_cpu = await arq_phase(stack, args, storage, 0.5)
        tuned, tuned_done, tuned_cpu = await arq_phase(stack, args, storage, args.arq_poll_delay)

    line = bunch.line
    u_bunch, u_arq, u_tuned, u_direct = (x.utilization(ideal) for x in (line, arq, tuned, direct))
    report.add(B1, "ideal makespan N*T/C", fmt_s(ideal))
    report.add(B1, "(a) arq default: makespan to last run finished", fmt_s(arq.makespan))
    report.add(B1, "(a') arq tuned: makespan to last run finished", fmt_s(tuned.makespan))
    report.add(B1, "(b) emulator queue: makespan to last run finished", fmt_s(direct.makespan))
    report.add(B1, "Bunch utilization (ideal / makespan)", fmt_pct(u_bunch))
    report.add(B1, "(a) arq default utilization", fmt_pct(u_arq))
    report.add(B1, "(a') arq tuned utilization", fmt_pct(u_tuned))
    report.add(B1, "(b) emulator-queue utilization", fmt_pct(u_direct))
    report.add(B1, "Bunch / (b) emulator queue", f"{u_bunch / u_direct:.3f}", "≥ 0.99", u_bunch / u_direct >= 0.99)
    report.add(B1, "Bunch / (a') arq tuned", f"{u_bunch / u_tuned:.3f}", "≥ 1.2", u_bunch / u_tuned >= 1.2)
    report.add(B1, "Bunch / (a) arq default", f"{u_bunch / u_arq:.3f}")
    # For reference: the same webhook path on the same emulator, so what (b) has over both is not dispatch.
    report.add(B1, "Bunch / (f) minimal dispatcher", f"{u_bunch / floor.line.utilization(ideal):.3f}")
    refill = line.refill or [0.0]
    report.add(B1, "Bunch: median slot refill (freed → next started)", fmt_ms(median(refill)))
    most = line.max_in_progress
    report.add(B1, "Bunch: max runs in progress / C", f"{most / args.workers:.3f} ({most} / {args.workers})",
               "≤ 1.000", most <= args.workers)  # fmt: skip
    report.note(
        B1,
        f"""Workload: {args.runs} runs of {args.sleep_ms} ms on C = {args.workers} emulator workers
(`deploy/emulators/runpod.py --sleep-ms {args.sleep_ms} --workers {args.workers}`),
{args.jobs} semi_auto jobs of {args.runs // args.jobs * 4} images ({args.runs // args.jobs} runs each),
BUNCH_MAX_CONCURRENCY={args.workers}, BUNCH_DISPATCH_PREFETCH={args.prefetch}: about
{args.workers * 1000 / args.sleep_ms:.0f} /run calls per s, within RunPod's limit of 100 (1,000 per 10 s, of which
Bunch's dispatcher takes 90 %): beyond it every dispatcher is bound by the limit, not by how it dispatches.
The sleep handler returns `{{"images": []}}`, so every image ends
failed `missing_output` and every job ends `failed` (the packager finds no image): this benchmark
measures runs, not images.

- Bunch: {describe(line)}. Slot refill = emulator finished -> webhook -> gateway -> XADD ->
  dispatcher COMPLETE_RUN -> RECORD_STARTED_AND_CLAIM -> presign -> POST /run -> an emulator worker picks it up; of it,
  freed -> next *received* by RunPod: median {median(line.react or [0.0]) * 1000:.1f} ms. Every job
  final after {bunch.jobs_makespan:.2f} s.
- (a) arq 0.28 worker as a user would write it (bench/arq_worker.py): max_jobs={args.workers},
  defaults otherwise (poll_delay 0.5 s), each job POSTs /run then polls /status every
  {args.arq_poll_ms} ms (`--arq-poll-ms`), no webhooks: {describe(arq)}; every arq job done after
  {arq_done:.2f} s; {cpu_text(arq_cpu)}. arq reads up to 250 queued ids per poll but stops at the first one it
  cannot start (job_counter >= max_jobs), so a freed slot waits for the next poll: up to poll_delay.
- (a') the same worker with poll_delay {args.arq_poll_delay} s (`--arq-poll-delay`), a tuned arq:
  {describe(tuned)}; every arq job done after {tuned_done:.2f} s;
  {cpu_text(tuned_cpu)} (its /status polling costs CPU: on 2 shared cores that slows it down).
- (b) {args.runs} POST /run at once ({args.workers} connections, within RunPod's /run limit), each with a
  webhook to a receiver that answers 200, the emulator's own FIFO queue: {describe(direct)}.
- (f) benchmark 2's minimal dispatcher (bench/dispatch_floor.py), for reference: utilization
  {fmt_pct(floor.line.utilization(ideal))}; {describe(floor.line)}.

Judged: Bunch / (b) ≥ 0.99, the queue RunPod itself offers (nothing can feed C workers faster
than runs already waiting in it), so Bunch loses at most 1 % to dispatching; Bunch / (a') ≥ 1.2, a
margin over the best arq setting; max runs in progress / C ≤ 1, Bunch never goes over the cap.
(b)'s runs carry a webhook too: the emulator's one event loop POSTs C webhooks per wave of
completions, which delays its workers' next pick-up by a millisecond or two per wave; without them
(b) was 0.3-0.6 % ahead of Bunch and of (f), which does nothing but dispatch, for that reason alone.
Utilization uses makespan = first submit -> last run finished on the emulator (the
/_emulator/jobs timestamps); Bunch's figure to "every job final" adds the packager's verdict.""",
    )

    n = line.runs
    per_run = {name: used / n for name, used in bunch.cpu.items()}
    floor_per_run = floor.cpu["minimal dispatcher"] / floor.line.runs
    # A smoke run's floor may stay under one 10 ms tick.
    ratio = per_run["dispatcher"] / floor_per_run if floor_per_run else float("inf")
    # Two decimals: the ratio below should be checkable from these two.
    report.add(B2, "dispatcher CPU per run", f"{per_run['dispatcher'] * 1000:.2f} ms")
    report.add(B2, "minimal dispatcher CPU per run (floor, same Redis and emulator)", f"{floor_per_run * 1000:.2f} ms")
    report.add(B2, "dispatcher / minimal dispatcher CPU per run", f"{ratio:.2f}", f"≤ {FLOOR_RATIO_MAX}",
               ratio <= FLOOR_RATIO_MAX)  # fmt: skip
    report.add(B2, "(a') arq tuned worker CPU per run", fmt_ms(tuned_cpu["arq worker"] / tuned.runs))
    report.add(B2, "gateway CPU per run", fmt_ms(per_run["gateway"]))
    report.add(B2, "redis-server CPU per run", fmt_ms(per_run["redis-server"]))
    report.add(
        B2,
        "dispatcher + gateway + redis CPU per run",
        fmt_ms(per_run["dispatcher"] + per_run["gateway"] + per_run["redis-server"]),
    )
    report.add(B2, "packager CPU per run (for reference)", fmt_ms(per_run["packager"]))
    report.add(B2, "RunPod emulator CPU per run (for reference)", fmt_ms(per_run["RunPod emulator"]))
    counts = floor.counts
    wall = bunch.jobs_makespan
    profiled = ""
    if bunch.profiles:
        profiled = "\n".join(
            ["", "Profiled run (`--profile`, py-spy at 100 Hz: figures above perturbed):", *bunch.profiles]
        )
    report.note(
        B2,
        f"""CPU seconds over the whole Bunch phase of benchmark 1 ({n} runs, {wall:.1f} s from the first
submit to the last job final), from utime+stime in /proc/<pid>/stat (10 ms ticks):
{", ".join(f"{name} {used:.2f} s ({used / wall * 100:.0f} % of a core)" for name, used in bunch.cpu.items())}.
Per run the dispatcher makes up to four Redis round trips (fewer when outcomes come together) and
one HTTP call: it reads the webhook's
task-result message (XREADGROUP, carrying the XACK of the previous batch), reads the run's record
(ResultHandler._current), builds 4 ImageRecords, stores the outcome and claims the next runs in
one round trip (COMPLETE_RUN + RECORD_STARTED_AND_CLAIM Lua, shared/stores/runs.py
settle_and_claim), presigns 4 PUT links, POSTs /run, and records the run's RunPod id with the next
pass (a pass of its own when no outcome comes within 5 ms); it also counts metrics and gates
its RunPod calls within RunPod's limits. The gateway verifies the webhook token and XADDs. On this
VM one Redis round trip costs the client 60-100 µs of CPU (a raw asyncio PING 60 µs, redis-py's
85-100 µs): round trips, not Python code, are most of the cost.

The floor: bench/dispatch_floor.py, a minimal dispatcher of the same design, run after the Bunch
phase with Bunch's services stopped, on the same redis-server (db 2) and the same emulator, its
webhooks XADDed by a receiver in another process (bench/webhook_sink.py, the gateway's part). Per
run it does only what every dispatcher of this design must: one XREADGROUP (the XACK riding
along), one EVALSHA that records the finished run and the RunPod ids of runs started since, and
pops the next run id (claim + record in one round trip, as Bunch's scripts do), one POST /run of
a prebuilt input shaped like Bunch's (presigning not counted) with its webhook URL. This run:
{counts["reads"] / n:.2f} reads and {counts["claim_calls"] / n:.2f} claim round trips per run,
{counts["posts"]} POST /run; over its phase minimal dispatcher {floor.cpu["minimal dispatcher"]:.2f} s,
webhook sink {floor.cpu["webhook sink"]:.2f} s, redis-server {floor.cpu["redis-server"]:.2f} s
({floor.cpu["redis-server"] / floor.line.runs * 1000:.2f} ms per run against Bunch's
{per_run["redis-server"] * 1000:.2f} ms: Bunch's scripts do far more per run), RunPod emulator
{floor.cpu["RunPod emulator"]:.2f} s.
Why this floor: the same libraries (redis-py's asyncio client with hiredis made by
shared/redis_connection.connect, aiohttp, uvloop, the garbage collector settled as the services
settle it), the same Redis, the same emulator and the same kind of round trips, so the CPU model
and the machine cancel out of the ratio and the target holds on any CPU; what the ratio shows is
what Bunch does beyond the necessary (its checks, records, presigning, metrics, request gates). Why not
arq: its worker polls /status, a CPU cost that grows with the run time (and arq's queue polls
with the idle time), so it is no floor of anything ((a') above: {fmt_ms(tuned_cpu["arq worker"] / tuned.runs)}
per run here).
Target ≤ {FLOOR_RATIO_MAX}: eight full runs (1,000 runs each) on the 2-core AMD EPYC VM, quiet (other
load ≤ 0.02 cores), measured 2.46 to 3.36, mean 2.9. Each side's CPU per run varies up to ±15 % from
one run to the next (the completions come in waves that batch differently; the VM's neighbours),
the ratio somewhat less as both move together; {FLOOR_RATIO_MAX} is 19 % above the highest of them, so
a miss says Bunch's own work per run grew, not noise. The floor does about one Redis round trip per
run on average here: completions come in waves of C (every run sleeps the same T), so one read
and one claim pipeline serve two or three of them; Bunch batches the same waves.
{profiled}""",
    )
    return report.finish([B1, B2])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=20)
    p.add_argument("--workers", type=int, default=10, help="RunPod concurrency C = BUNCH_MAX_CONCURRENCY")
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
    per_window = args.workers + args.prefetch + args.workers * 1000 / args.sleep_ms * WINDOW_SECONDS
    if args.runs > RUN_BUDGET and per_window > RUN_BUDGET:
        p.error(
            f"about {per_window:.0f} /run calls per {WINDOW_SECONDS:g} s: over the {RUN_BUDGET:.0f} Bunch allows "
            "itself of RunPod's limit, so every dispatcher would be rate-bound; fewer --workers or a longer --sleep-ms"
        )
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
