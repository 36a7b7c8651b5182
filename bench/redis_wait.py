"""What BUNCH_REDIS_WAIT_REPLICAS=1 costs the dispatcher per run: Redis WAIT after every pass.

Drives the dispatcher's own Redis work through RunStore.settle_and_claim (no service, no RunPod)
against a private primary and one replica, both redis-server processes with AOF (everysec) as in
production. Each side gets a freshly flushed data set of `--runs` runs (jobs of 10 runs of 4
images, created up front) and runs the dispatcher's steady state back to back: every pass stores
the outcomes of the runs claimed two passes ago, records the RunPod ids of those claimed in the
previous one and claims as many again (a cap of 2 x `k` in flight, `k` runs per pass), until all
have completed. Once with redis_wait_replicas=0 and once with 1, for k = 1 (an outcome per pass,
the dispatcher's steady state when runs are many) and k = 8, in alternating order over `--rounds`.

Then passes at a fixed rate (`--rate` a second, one run each), as a dispatcher that idles between
them: `--stall-seconds` with the replica up, in halves of redis_wait_replicas 0, 1, 1, 0; then the
degenerate case, `--stall-seconds` each with redis_wait_replicas=1 and the replica stopped
(SIGSTOP: it holds its connection, answers nothing), then killed. RunStore waits out the timeout
once, then sends no WAIT for REPLICA_RETRY_SECONDS.

Figures: wall time of the settle_and_claim calls per run and per pass, the client's CPU in them
(time.process_time), and the primary's and replica's CPU per run (/proc, 10 ms ticks).

    python -m bench.redis_wait [--runs 2000] [--rounds 4] [--stall-seconds 10] [--no-record]
"""

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from bench.common import Contention, command, cpu_model, cpu_seconds, parser, percentile
from bench.memory import image_records
from deploy.processes import Process, free_port, scratch_dir, start_redis
from shared import keys, planning, scripts
from shared.models import RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from shared.stores.records import ClaimedRun, Completion, StartedRun
from shared.stores.runs import REPLICA_RETRY_SECONDS, RunStore

HEADING = "## Waiting for a replica (BUNCH_REDIS_WAIT_REPLICAS)"
RUNS_PER_JOB = 10
CONFIG = SemiAutoJobRequest(mode="semi_auto", group="bench", prompts=["a lighthouse at dusk"], images_per_prompt=40)


@dataclass
class Servers:
    workdir: Path
    primary: Process
    replica: Process
    primary_url: str
    replica_url: str

    def pid(self, proc: Process) -> int:
        assert proc.popen is not None
        return proc.popen.pid


def start_servers(workdir: Path) -> Servers:
    (workdir / "primary").mkdir()
    (workdir / "replica").mkdir()
    primary_port = free_port()
    primary, primary_url = start_redis(workdir / "primary", primary_port, appendonly=True, name="redis")
    try:
        replica, replica_url = start_redis(
            workdir / "replica",
            appendonly=True,
            name="redis-replica",
            extra_args=("--replicaof", "127.0.0.1", str(primary_port)),
        )
    except BaseException:
        primary.stop()
        raise
    return Servers(workdir, primary, replica, primary_url, replica_url)


async def caught_up(primary: Redis, replica: Redis) -> None:
    """Until the replica is linked and holds everything the primary has written so far (30 s at most)."""
    target = int((await primary.info("replication"))["master_repl_offset"])
    async with asyncio.timeout(30):
        while True:
            info = await replica.info("replication")
            if info.get("master_link_status") == "up" and int(info.get("slave_repl_offset", -1)) >= target:
                return
            await asyncio.sleep(0.01)


async def fresh_data(primary: Redis, replica: Redis, runs: int) -> None:
    """A flushed data set with `runs` runs queued (jobs of RUNS_PER_JOB), the replica caught up, and
    both AOFs rewritten: what earlier rows wrote would otherwise trigger a rewrite (a fork and a
    child busy for a while) in the middle of a later row."""
    await primary.flushall()
    store = JobStore(primary, Settings(redis_url="redis://unused"))
    jobs = -(-runs // RUNS_PER_JOB)
    for start in range(0, jobs, 100):
        await asyncio.gather(*(store.create("bench", CONFIG) for _ in range(min(100, jobs - start))))
    await caught_up(primary, replica)
    for server in (primary, replica):
        await rewrite_aof(server)


async def aof_rewrites(*servers: Redis) -> int:
    return sum([int((await server.info("persistence"))["aof_rewrites"]) for server in servers])


async def rewrite_aof(redis: Redis) -> None:
    """BGREWRITEAOF, and until it has finished (30 s at most)."""
    async with asyncio.timeout(30):
        while True:  # one already running refuses another
            info = await redis.info("persistence")
            if not int(info["aof_rewrite_in_progress"]) and not int(info["aof_rewrite_scheduled"]):
                break
            await asyncio.sleep(0.02)
        before = int(info["aof_rewrites"])
        await redis.bgrewriteaof()
        while True:
            info = await redis.info("persistence")
            if int(info["aof_rewrites"]) > before and not int(info["aof_rewrite_in_progress"]):
                return
            await asyncio.sleep(0.02)


def completion(run: ClaimedRun) -> Completion:
    run_id, attempt, claim = run
    _, name = keys.split_run_id(run_id)
    slots = planning.run_slots(CONFIG, int(name), 4)
    return Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, image_records(run_id, attempt, claim, list(slots)))


def unreplicated_writes() -> float:
    return REGISTRY.get_sample_value("bunch_redis_unreplicated_writes_total") or 0.0


class Pipeline:
    """The dispatcher's runs in flight: claimed last pass (to record as started), and started."""

    def __init__(self, runs: RunStore, per_pass: int) -> None:
        self.runs = runs
        self.per_pass = per_pass
        self.claimed: list[ClaimedRun] = []
        self.started: deque[ClaimedRun] = deque()
        self.completed = 0

    async def one_pass(self, limit: int) -> tuple[float, float, int]:
        """One settle_and_claim: (wall s, client CPU s, runs completed)."""
        done = [self.started.popleft() for _ in range(min(self.per_pass, len(self.started)))]
        completions = [completion(run) for run in done]
        started = [StartedRun(*run, f"rp-{run.claim}") for run in self.claimed]
        now = time.time()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stored, claims = await self.runs.settle_and_claim(completions, now, now + 600, limit, started)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if isinstance(claims, Exception):
            raise claims
        if not all(outcome is True for outcome in stored) or not all(claims.recorded):
            raise RuntimeError(f"a pass was refused: stored {stored}, recorded {claims.recorded}")
        self.started.extend(self.claimed)
        self.claimed = claims.runs
        self.completed += len(done)
        return wall, cpu, len(done)

    @property
    def in_flight(self) -> int:
        return len(self.claimed) + len(self.started)


@dataclass
class Side:
    per_pass: int
    wait: int
    round: int
    runs: int = 0
    passes: list[float] = field(default_factory=list)  # wall s of each settle_and_claim
    cpu: float = 0.0
    primary_cpu: float = 0.0
    replica_cpu: float = 0.0
    unreplicated: float = 0.0
    aof_rewrites: int = 0

    @property
    def wall(self) -> float:
        return sum(self.passes)


async def run_side(servers: Servers, replica: Redis, side: Side, runs: int, timeout_ms: int) -> Side:
    redis = Redis.from_url(servers.primary_url, decode_responses=True)
    try:
        await fresh_data(redis, replica, runs)
        settings = Settings(
            redis_url=servers.primary_url,
            max_concurrency=2 * side.per_pass,
            redis_wait_replicas=side.wait,
            redis_wait_timeout_ms=timeout_ms,
        )
        pipeline = Pipeline(RunStore(redis, settings), side.per_pass)
        rewrites = await aof_rewrites(redis, replica)
        unreplicated = unreplicated_writes()
        primary0 = cpu_seconds(servers.pid(servers.primary))
        replica0 = cpu_seconds(servers.pid(servers.replica))
        while pipeline.completed < runs:
            wall, cpu, _ = await pipeline.one_pass(side.per_pass)
            side.passes.append(wall)
            side.cpu += cpu
        side.primary_cpu = cpu_seconds(servers.pid(servers.primary)) - primary0
        side.replica_cpu = cpu_seconds(servers.pid(servers.replica)) - replica0
        side.runs = pipeline.completed
        side.unreplicated = unreplicated_writes() - unreplicated
        side.aof_rewrites = await aof_rewrites(redis, replica) - rewrites
    finally:
        await redis.aclose()
    return side


@dataclass
class Period:
    label: str
    passes: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # s each pass started after its scheduled time
    runs: int = 0
    unreplicated: float = 0.0


async def paced(servers: Servers, label: str, seconds: float, rate: float, timeout_ms: int, wait: int = 1) -> Period:
    """Passes of one run each at `rate` a second for `seconds` (late ones run at once, back to
    back, until the schedule is met again), redis_wait_replicas=`wait`, a fresh RunStore."""
    redis = Redis.from_url(servers.primary_url, decode_responses=True)
    period = Period(label)
    try:
        settings = Settings(
            redis_url=servers.primary_url, max_concurrency=2, redis_wait_replicas=wait, redis_wait_timeout_ms=timeout_ms
        )
        pipeline = Pipeline(RunStore(redis, settings), 1)
        unreplicated = unreplicated_writes()
        began = time.perf_counter()
        for i in range(int(seconds * rate)):
            due = began + i / rate
            ahead = due - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
            period.late.append(max(0.0, time.perf_counter() - due))
            wall, _, _ = await pipeline.one_pass(1)
            period.passes.append(wall)
        period.runs = pipeline.completed
        period.unreplicated = unreplicated_writes() - unreplicated
        while pipeline.in_flight:  # settle what is left, unmeasured
            await pipeline.one_pass(0)
    finally:
        await redis.aclose()
    return period


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def side_row(side: Side) -> list[str]:
    return [
        str(side.round),
        str(side.per_pass),
        str(side.wait),
        f"{len(side.passes):,}",
        us(side.wall / side.runs),
        us(side.wall / len(side.passes)),
        f"{us(statistics.median(side.passes))} / {us(percentile(side.passes, 0.99))}",
        us(side.cpu / side.runs),
        us(side.primary_cpu / side.runs),
        us(side.replica_cpu / side.runs),
    ]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def added_rows(sides: list[Side]) -> list[list[str]]:
    rows = []
    for k in sorted({s.per_pass for s in sides}):
        off = [s for s in sides if s.per_pass == k and s.wait == 0]
        on = [s for s in sides if s.per_pass == k and s.wait == 1]
        wall0, wall1 = mean([s.wall / s.runs for s in off]), mean([s.wall / s.runs for s in on])
        pass0 = mean([s.wall / len(s.passes) for s in off])
        pass1 = mean([s.wall / len(s.passes) for s in on])
        p50_0 = mean([statistics.median(s.passes) for s in off])
        p50_1 = mean([statistics.median(s.passes) for s in on])
        cpu0, cpu1 = mean([s.cpu / s.runs for s in off]), mean([s.cpu / s.runs for s in on])
        prim0, prim1 = mean([s.primary_cpu / s.runs for s in off]), mean([s.primary_cpu / s.runs for s in on])
        rep0, rep1 = mean([s.replica_cpu / s.runs for s in off]), mean([s.replica_cpu / s.runs for s in on])
        rows.append(
            [
                "added (mean of rounds)",
                str(k),
                "1 vs 0",
                "",
                f"{(wall1 - wall0) * 1e6:+,.0f} µs ({wall1 / wall0 - 1:+.0%})",
                f"{(pass1 - pass0) * 1e6:+,.0f} µs",
                f"{(p50_1 - p50_0) * 1e6:+,.0f} µs p50",
                f"{(cpu1 - cpu0) * 1e6:+,.0f} µs ({cpu1 / cpu0 - 1:+.0%})",
                f"{(prim1 - prim0) * 1e6:+,.0f} µs",
                f"{(rep1 - rep0) * 1e6:+,.0f} µs",
            ]
        )
    return rows


def period_row(period: Period, timeout_ms: int) -> list[str]:
    slow = [t for t in period.passes if t >= 0.9 * timeout_ms / 1000]
    return [
        period.label,
        f"{len(period.passes):,} ({period.runs:,} runs)",
        f"{sum(period.passes) * 1000:,.0f} ms",
        f"{len(slow)} ({sum(slow) * 1000:,.0f} ms)",
        us(statistics.median(period.passes)),
        f"{max(period.passes) * 1000:,.1f} ms",
        f"{sum(1 for t in period.late if t > 0.010)} / {max(period.late) * 1000:,.1f} ms",
        f"{period.unreplicated:.0f}",
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


SIDE_HEADER = [
    "round",
    "runs per pass",
    "WAIT replicas",
    "passes",
    "wall per run",
    "wall per pass",
    "pass p50 / p99",
    "client CPU per run",
    "primary CPU per run",
    "replica CPU per run",
]
PERIOD_HEADER = [
    "replica",
    "passes",
    "time in passes",
    "passes that waited out the timeout",
    "pass p50",
    "slowest pass",
    "passes > 10 ms late / latest",
    "unreplicated writes counted",
]


BEGIN, END = "<!-- redis_wait:begin -->", "<!-- redis_wait:end -->"


def replace_section(path: Path, text: str) -> None:
    """This benchmark's section of RESULTS.md replaced by `text`, or appended the first time (under
    the lock bench.common's writer takes): a run replaces the last one's figures, never adds a copy."""
    with open(Path(tempfile.gettempdir()) / "bunch-bench-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.exists() else ""
        block = f"{BEGIN}\n{text.strip()}\n{END}"
        if BEGIN in old and END in old:
            head, rest = old.split(BEGIN, 1)
            path.write_text(head + block + rest.split(END, 1)[1])
            return
        path.write_text(without_unmarked_sections(old).rstrip("\n") + "\n\n" + block + "\n")


def without_unmarked_sections(text: str) -> str:
    """`text` without the sections earlier runs appended before the markers: each from HEADING to
    the next heading of its level or above."""
    kept: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        if line.rstrip("\n") == HEADING:
            inside = True
            continue
        if inside and line.startswith(("# ", "## ", "<!-- ")):
            inside = False
        if not inside:
            kept.append(line)
    return "".join(kept)


async def main_async(args: Any) -> int:
    load_before = os.getloadavg()
    contention = Contention()
    began = time.monotonic()
    workdir = scratch_dir("bunch-bench-redis-wait-")
    servers = start_servers(workdir)
    replica = Redis.from_url(servers.replica_url, decode_responses=True)
    sides: list[Side] = []
    periods: list[Period] = []
    try:
        primary = Redis.from_url(servers.primary_url, decode_responses=True)
        for script in (scripts.COMPLETE_RUN, scripts.RECORD_STARTED_AND_CLAIM):
            await primary.script_load(script.text)
        await caught_up(primary, replica)
        await primary.aclose()
        print(f"redis_wait: {args.runs} runs per side, {args.rounds} rounds, WAIT timeout {args.timeout_ms} ms")
        for round_ in range(1, args.rounds + 1):
            for k in args.per_pass:
                for wait in (0, 1) if round_ % 2 else (1, 0):
                    side = await run_side(servers, replica, Side(k, wait, round_), args.runs, args.timeout_ms)
                    sides.append(side)
                    print("  " + " | ".join(side_row(side)), flush=True)
                    if side.unreplicated or side.aof_rewrites:
                        print(f"    {side.unreplicated:.0f} unreplicated, {side.aof_rewrites} AOF rewrites", flush=True)

        if args.stall_seconds > 0:
            primary = Redis.from_url(servers.primary_url, decode_responses=True)
            await fresh_data(primary, replica, 4 * int(args.stall_seconds * args.rate) + 6 * RUNS_PER_JOB)

            async def period(label: str, seconds: float, wait: int = 1) -> None:
                periods.append(await paced(servers, label, seconds, args.rate, args.timeout_ms, wait))
                print("  " + " | ".join(period_row(periods[-1], args.timeout_ms)), flush=True)

            for wait in (0, 1, 1, 0):  # halves, in ABBA order
                await period(f"up, WAIT replicas {wait}", args.stall_seconds / 2, wait)
                await caught_up(primary, replica)
            await primary.aclose()
            servers.replica.signal(signal.SIGSTOP)
            try:
                await period("stopped, WAIT replicas 1", args.stall_seconds)
            finally:
                servers.replica.signal(signal.SIGCONT)
            servers.replica.kill()
            await period("killed, WAIT replicas 1", args.stall_seconds)
    finally:
        with contextlib.suppress(Exception):
            await replica.aclose()
        servers.replica.signal(signal.SIGCONT)
        servers.replica.stop()
        servers.primary.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    other = contention.describe()

    runs_table = table(SIDE_HEADER, [side_row(s) for s in sides] + added_rows(sides))
    stall_table = table(PERIOD_HEADER, [period_row(p, args.timeout_ms) for p in periods]) if periods else ""
    print("\n" + runs_table + ("\n\n" + stall_table if stall_table else ""))
    loads = "load average {:.2f} {:.2f} {:.2f} before, {:.2f} {:.2f} {:.2f} after".format(*load_before, *load_after)
    print(f"\n{loads}; other load during the run: {other}; whole run {time.monotonic() - began:.0f} s")
    if not args.record:
        return 0
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    stalls = ""
    if periods:
        stalls = f"""
Then passes at {args.rate:g} a second, one run each (a run completed, one recorded as started, one
claimed), a fresh RunStore per row; a late pass runs at once, and the passes after it back to back
until the schedule is met again. "up" rows: the replica answering, WAIT replicas 0 and 1, in the
order shown, {args.stall_seconds / 2:g} s each (the A/B of a dispatcher that idles between passes).
Then {args.stall_seconds:g} s each with WAIT replicas 1 and the replica stopped (SIGSTOP: its
connection stays open, nothing answers), then killed (SIGKILL: the primary drops the link). After
a WAIT no replica confirmed, RunStore sends none for {REPLICA_RETRY_SECONDS:g} s
(REPLICA_RETRY_SECONDS) and counts that pass's writes (metrics.UNREPLICATED_WRITES). Redis checks
a blocked WAIT's timeout on its serverCron tick (hz 10 by default), so a WAIT that times out
returns 100 to 200 ms after it was sent.

{stall_table}
"""
    unconfirmed = sum(side.unreplicated for side in sides)
    rewrites = sum(side.aof_rewrites for side in sides)
    section = f"""{HEADING}

    {command()}

{now} UTC; {os.cpu_count()} cores, {cpu_model()};
{loads};
other load during the run (CPU outside the benchmark's process tree, from /proc/stat) {other};
whole run {time.monotonic() - began:.0f} s.

The dispatcher's Redis work only, through RunStore.settle_and_claim (no service, no RunPod),
against a private primary and one replica (redis-server {redis_version()}, both with AOF
appendfsync everysec, on loopback on the same machine). Each row is {args.runs:,} runs on a freshly
flushed data set (jobs of {RUNS_PER_JOB} runs of 4 images, created up front, the replica caught up
before the first pass), passes back to back: each stores the outcomes of the runs claimed two passes
before (full image records), records the RunPod ids of those claimed in the previous one and claims
as many again, k runs a pass, at most 2k in flight. WAIT replicas 1 adds `WAIT 1 {args.timeout_ms}`
to the pass's pipeline (one round trip either way). Wall and client CPU (time.process_time) are
those of the settle_and_claim calls only; the primary's and replica's CPU are from /proc (10 ms
ticks). Sides alternate their order each round. Both AOFs are rewritten before each row.
WAITs no replica confirmed in time: {unconfirmed:.0f}. AOF rewrites during the rows: {rewrites}.

{runs_table}
{stalls}"""
    if args.record:
        replace_section(Path(args.results), section)
        print(f"  written to {args.results}", flush=True)
    return 0


def redis_version() -> str:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return next((part[2:] for part in out.split() if part.startswith("v=")), "?")


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=2000, help="runs per side")
    p.add_argument("--per-pass", default="1,8", help="runs completed and claimed per pass, comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="A/B rounds, order alternating")
    p.add_argument("--timeout-ms", type=int, default=100, help="BUNCH_REDIS_WAIT_TIMEOUT_MS")
    p.add_argument("--stall-seconds", type=float, default=10.0, help="per replica state; 0 skips the stall part")
    p.add_argument("--rate", type=float, default=200.0, help="passes a second in the stall part")
    args = p.parse_args()
    args.per_pass = [int(k) for k in args.per_pass.split(",") if k]
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
