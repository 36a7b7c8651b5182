"""Redis time per scheduling operation as the number of tenants (projects) and queued jobs grows.

Three queue shapes, each on a private redis-server of its own, measured side by side in one run
and in turns (a window of claims or a chunk of reads each), so whatever else the machine does falls
on all of them alike: 1 project x 200 queued jobs (the baseline), 100 projects x 200 (20,000 jobs)
and 1,000 projects x 2. Every job is semi_auto with 8 images (2 runs of 4), priority n % 5. The project's
Lua scripts run through the stores directly: no service, no HTTP. The figures are Redis's own
accounting, not client wall time: EVAL/EVALSHA `usec` of INFO commandstats over windows that hold
only the calls measured, read after every call for the slowest single one.

- per run started (the median window): acquire_many with limit 1, then with limit 16, in windows of
  claims only;
  completions (oldest first, down to half the cap) and replacement jobs happen between windows, so
  claims keep finding free slots and the queue keeps its shape;
- per status read (the median read): status_for_project on queued jobs not started yet, most picked at random, a
  fifth the last of their project's queue;
- the script calls' 99th percentile per shape and the slowest calls (reported).

    python -m bench.tenants [--runs 1000 --reads 2000] [--smoke] [--no-record]
"""

import asyncio
import random
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from bench.common import Report, parser, percentile
from deploy.processes import scratch_dir, start_redis
from shared import keys
from shared.models import ImageStatus, RunStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore
from shared.stores.records import ClaimedRun, Completion, ImageRecord
from shared.stores.runs import RunStore

BENCH = "tenants"
CAP = 64
# Claims per window: at most CAP - WINDOW runs are in flight before one, so no claim meets the cap.
WINDOW = CAP // 2
CONFIGS = {p: SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=8, priority=p) for p in range(5)}


@dataclass(frozen=True)
class Shape:
    label: str
    projects: int
    jobs: int  # queued per project


SHAPES = [Shape("1x200", 1, 200), Shape("100x200", 100, 200), Shape("1,000x2", 1000, 2)]
SMOKE_SHAPES = [Shape("1x20", 1, 20), Shape("100x20", 100, 20), Shape("1,000x2", 1000, 2)]


@dataclass
class Figures:
    per_run: dict[int, float] = field(default_factory=dict)  # claim limit -> Redis s per run started
    per_status: float = 0.0
    calls: list[tuple[float, str]] = field(default_factory=list)  # s of each script call, and what it was
    script_calls: dict[str, int] = field(default_factory=dict)


async def chunked(calls: Iterable[Awaitable[Any]], size: int = 500) -> list[Any]:
    """Many calls in flight at once, a chunk at a time (setup and bookkeeping, never measured)."""
    pending, out = list(calls), []
    for i in range(0, len(pending), size):
        out += await asyncio.gather(*pending[i : i + size])
    return out


class Window:
    """Redis's own time for the script calls made inside `async with`, and the longest of them.

    Each call's time is the growth of EVAL/EVALSHA usec in INFO commandstats across it (call
    `mark()` after each). SLOWLOG would give it too, but Redis 7 also logs every command a script
    runs, which at threshold 0 inflated the scripts' own usec about 2x in a trial run.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.usec = self.calls = 0
        self.each: list[int] = []  # usec of each marked stretch

    async def __aenter__(self) -> "Window":
        await self.redis.config_resetstat()
        return self

    async def mark(self) -> None:
        stats = await self.redis.info("commandstats")
        usec = sum(int(stats.get(name, {}).get("usec", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))
        self.calls = sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))
        self.each.append(usec - self.usec)
        self.usec = usec

    async def __aexit__(self, *exc: object) -> None:
        await self.mark()


class Tenants:
    """One shape's queue, kept at its size while runs are claimed and completed."""

    def __init__(self, store: JobStore, runs: RunStore, shape: Shape) -> None:
        self.store = store
        self.runs = runs
        self.shape = shape
        self.jobs: dict[str, tuple[str, int, int]] = {}  # job id -> project, priority, runs_total
        self.waiting: dict[str, dict[str, tuple[int, int]]] = {}  # project -> job id -> (priority, seq), none started
        self.started: dict[str, int] = {}  # job id -> runs claimed
        self.in_flight: deque[ClaimedRun] = deque()
        self.n = 0

    async def create(self, project: str, priority: int | None = None) -> None:
        if priority is None:
            priority, self.n = self.n % 5, self.n + 1
        job = await self.store.create(project, CONFIGS[priority])
        self.jobs[job.id] = (project, priority, job.runs_total)
        self.waiting.setdefault(project, {})[job.id] = (priority, job.seq)

    async def fill(self) -> None:
        projects = [f"tenant-{p:04d}" for p in range(self.shape.projects)]
        await chunked(self.create(project) for _ in range(self.shape.jobs) for project in projects)

    async def claim(self, limit: int) -> int:
        now = time.time()
        claims = await self.runs.acquire_many(now, now + 600, limit)
        if len(claims.runs) < limit:
            raise RuntimeError(f"{self.shape.label}: {len(claims.runs)} of {limit} claimed with slots free")
        for run in claims.runs:
            run_id = run.run_id
            self.in_flight.append(run)
            job_id, _ = keys.split_run_id(run_id)
            self.waiting[self.jobs[job_id][0]].pop(job_id, None)
            self.started[job_id] = self.started.get(job_id, 0) + 1
        return len(claims.runs)

    async def settle(self) -> None:
        """Complete the oldest runs down to CAP - WINDOW in flight; replace jobs that left the queue."""
        done = [self.in_flight.popleft() for _ in range(max(0, len(self.in_flight) - (CAP - WINDOW)))]
        await chunked(self.complete(run) for run in done)
        left = [job_id for job_id, n in self.started.items() if n >= self.jobs[job_id][2]]
        for job_id in left:
            del self.started[job_id]
        # Same project and priority: the mix of priorities ahead of every job stays as it was.
        await chunked(self.create(*self.jobs[job_id][:2]) for job_id in left)

    async def complete(self, run: ClaimedRun) -> None:
        run_id, attempt, claim = run
        job_id, _ = keys.split_run_id(run_id)
        now = time.time()
        slots = await self.runs.run_slots(run_id, CONFIGS[self.jobs[job_id][1]])
        images = {
            i: ImageRecord(
                status=ImageStatus.SUCCEEDED,
                attempt=attempt,
                object_key=f"bench/{job_id}/{i}.png",
                mime_type="image/png",
                bytes=1000,
                finished_at=now,
            )
            for i in slots
        }
        if not await self.runs.complete(Completion(run_id, attempt, claim, RunStatus.SUCCEEDED, images)):
            raise RuntimeError(f"run {run_id} attempt {attempt} was not live")

    def status_sample(self, reads: int, rng: random.Random) -> list[tuple[str, str]]:
        waiting = [(project, job_id) for project, jobs in self.waiting.items() for job_id in jobs]
        lasts = [(p, max(jobs, key=lambda j: jobs[j])) for p, jobs in self.waiting.items() if jobs]
        picks = [rng.choice(lasts) for _ in range(reads // 5)]
        return picks + [rng.choice(waiting) for _ in range(reads - len(picks))]

    async def status(self, project: str, job_id: str) -> None:
        found = await self.store.status_for_project(project, job_id)
        if found is None or found[1].position is None:
            raise RuntimeError(f"job {job_id} of {project} has no queue position")


@dataclass
class Side:
    """One shape on a redis-server of its own."""

    shape: Shape
    redis: Redis
    queue: Tenants
    figures: Figures = field(default_factory=Figures)


async def prepare(url: str, shape: Shape) -> Side:
    redis = Redis.from_url(url, decode_responses=True)
    settings = Settings(redis_url=url, max_concurrency=CAP)
    queue = Tenants(JobStore(redis, settings), RunStore(redis, settings), shape)
    started = time.monotonic()
    await queue.fill()
    print(f"  {shape.label}: {len(queue.jobs)} jobs queued in {time.monotonic() - started:.1f} s", flush=True)
    # Scripts loaded, and a run time on record, so status reads take their full path.
    await queue.claim(1)
    await queue.complete(queue.in_flight.popleft())
    await queue.status(*queue.status_sample(1, random.Random(0))[0])
    return Side(shape, redis, queue)


async def claim_window(side: Side, limit: int) -> tuple[float, int]:
    """Redis seconds and runs started of one window of claims; then the queue is settled again."""
    async with Window(side.redis) as window:
        got = 0
        while got < WINDOW:
            got += await side.queue.claim(limit)
            await window.mark()
    side.figures.calls += [(usec / 1e6, f"claim, limit {limit}") for usec in window.each]
    side.figures.script_calls[f"claim limit {limit}"] = side.figures.script_calls.get(f"claim limit {limit}", 0)
    side.figures.script_calls[f"claim limit {limit}"] += window.calls
    await side.queue.settle()
    return window.usec / 1e6, got


async def status_reads(side: Side, sample: list[tuple[str, str]]) -> list[float]:
    async with Window(side.redis) as window:
        for project, job_id in sample:
            await side.queue.status(project, job_id)
            await window.mark()
    side.figures.script_calls["status"] = side.figures.script_calls.get("status", 0) + window.calls
    each = [usec / 1e6 for usec in window.each[: len(sample)]]
    side.figures.calls += [(t, "status read") for t in each]
    return each


async def measure(sides: list[Side], args: Any) -> None:
    """The shapes in turn, a window (or a chunk of reads) each, so that whatever else the machine
    does falls on all of them alike; medians, so that a preempted window or read moves nothing."""
    for limit in (1, 16):
        per_run: dict[str, list[float]] = {side.shape.label: [] for side in sides}
        for _ in range(max(1, args.runs // WINDOW)):
            for side in sides:
                seconds, runs = await claim_window(side, limit)
                per_run[side.shape.label].append(seconds / runs)
        for side in sides:
            side.figures.per_run[limit] = statistics.median(per_run[side.shape.label])
    samples = {side.shape.label: side.queue.status_sample(args.reads, random.Random(1)) for side in sides}
    reads: dict[str, list[float]] = {side.shape.label: [] for side in sides}
    chunk = 50
    for start in range(0, args.reads, chunk):
        for side in sides:
            reads[side.shape.label] += await status_reads(side, samples[side.shape.label][start : start + chunk])
    for side in sides:
        side.figures.per_status = statistics.median(reads[side.shape.label])


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


async def main_async(args: Any) -> int:
    report = Report(args)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    print(f"tenants: {args.runs} runs per claim limit, {args.reads} status reads per shape", flush=True)
    workdir = scratch_dir("bunch-bench-tenants-")
    for shape in shapes:
        (workdir / shape.label).mkdir()
    servers = [start_redis(workdir / shape.label) for shape in shapes]
    began = time.monotonic()
    sides: list[Side] = []
    try:
        sides = [await prepare(url, shape) for shape, (_, url) in zip(shapes, servers, strict=True)]
        await measure(sides, args)
    finally:
        for side in sides:
            await side.redis.aclose()
        for proc, _ in servers:
            proc.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {side.shape.label: side.figures for side in sides}

    for label, f in results.items():
        report.add(BENCH, f"{label}: Redis per run started (claim limit 1)", ms(f.per_run[1]))
        report.add(BENCH, f"{label}: Redis per run started (claim limit 16)", ms(f.per_run[16]))
        report.add(BENCH, f"{label}: Redis per status read", ms(f.per_status))
        slowest, what = max(f.calls)
        report.add(BENCH, f"{label}: slowest script call", f"{ms(slowest)} ({what})")
    base, wide, many = (results[s.label] for s in shapes)
    claim_ratios = [many.per_run[limit] / base.per_run[limit] for limit in (1, 16)]
    report.add(
        BENCH,
        "per-run Redis, 1,000 projects / 1 project",
        " / ".join(f"{r:.2f}" for r in claim_ratios) + " (limit 1 / 16)",
        "≤ 1.5 each",
        max(claim_ratios) <= 1.5,
    )
    status_ratio = wide.per_status / base.per_status
    report.add(BENCH, "status Redis, 100x200 / 1 project", f"{status_ratio:.2f}", "≤ 1.5", status_ratio <= 1.5)
    report.add(BENCH, "status Redis at 100x200", ms(wide.per_status))
    # Reported, not judged: a limit-16 claim spans more projects when each has fewer runs, so calls
    # differ in size between shapes (per run they do not), and Redis's usec is elapsed time: the
    # few calls in thousands the OS preempted take milliseconds of nobody's work.
    p99 = {label: percentile([t for t, _ in f.calls], 0.99) for label, f in results.items()}
    report.add(BENCH, "script call p99 per shape", ", ".join(f"{label} {ms(t)}" for label, t in p99.items()))
    every = sorted(((t, what, label) for label, f in results.items() for t, what in f.calls), reverse=True)
    worst, worst_what, worst_label = every[0]
    p999, _, p999_label = every[len(every) // 1000]
    report.add(BENCH, "script call time, 99.9th percentile of all", f"{ms(p999)} ({p999_label}); slowest {ms(worst)}")
    calls = "; ".join(
        f"{label}: " + ", ".join(f"{n} {what}" for what, n in f.script_calls.items()) for label, f in results.items()
    )
    report.note(
        BENCH,
        f"""Shapes {", ".join(s.label for s in shapes)} (projects x queued jobs), each on a flushed private
redis-server, driven through the stores (no services): semi_auto jobs of 8 images (2 runs of 4), priority
n % 5, max_concurrency {CAP}. Per shape {args.runs} runs started with acquire_many(limit 1), then
{args.runs} with limit 16, in windows of {WINDOW} claims and nothing else; between windows the oldest
runs complete (SUCCEEDED) down to {CAP - WINDOW} in flight, and every job whose runs have all started
is replaced by a new one of the same project and priority, so the queue keeps its shape. Then
{args.reads} status_for_project reads of jobs with no run started, a fifth of them the last of their
project's queue (the figure is the median read). Times are Redis's: EVAL/EVALSHA usec of INFO
commandstats per window (script calls
counted: {calls}), read after every call: the slowest single call of those windows took
{ms(worst)} in {worst_label} ({worst_what}). Whole run {time.monotonic() - began:.0f} s,
setup included.""",
    )
    return report.finish([BENCH])


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=1000, help="runs started per shape and claim limit")
    p.add_argument("--reads", type=int, default=2000, help="status reads per shape")
    args = p.parse_args()
    if args.smoke:
        args.runs, args.reads = min(args.runs, 32), min(args.reads, 20)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
