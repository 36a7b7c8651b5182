"""Benchmark 4, open loop: the gateway's latency at a fixed arrival rate, beside the bare endpoint.

Requests arrive on a schedule, the i-th at t0 + i / rate, whether or not earlier ones have been
answered, and each latency runs from the request's *scheduled* time to the end of its answer: time
spent waiting in the client (no free connection, a late event loop) or in the server counts, so a
stalled server cannot hide behind fewer requests sent (no coordinated omission). Requests that fail
or time out count as errors, with the time they took. Achieved rate: answers with the expected
status that arrived inside the measured window, per second.

The load generator is its own process (`python -m bench.open_loop --worker`, driven over a pipe):
uvloop, a minimal HTTP/1.1 client (keep-alive connections, prepared request bytes, httptools to
parse answers; about 150 us of CPU per request here, aiohttp's client about 350), up to
--connections connections per server process, niced to -5 when allowed so that busy servers delay
it as little as possible, its garbage collector off during a slice. It checks that it kept the
schedule: its send lag (when a request actually started minus when it was scheduled; 1-2 ms from
timer granularity) is reported, and cells whose send lag p99 is over MAX_LAG_P99 are flagged (the
lag only ever adds latency).

The gateway runs as the product deploys it: `python -m services.gateway` (uvicorn with the
gateway's guarded protocol, one process per replica, see deploy/k8s/base/gateway.yaml and
docker-compose.yml). Two processes means two replicas, each on its own port, with requests spread
over them in turn, as the Service in front of the replicas spreads them; the product has no
multi-worker mode (services/gateway/server.py). The bare endpoint (bench/serve_app.py: FastAPI with
one Redis SET or GET per request, uvicorn with uvloop and httptools) runs the same way with the
same process counts.

Per route (GET /api/jobs/{id}/status first, while the queue holds only the set-up backlog, then
POST /api/jobs), process count and rate, every target is measured in alternating slices of about
SLICE_S seconds (each after its own warm-up, the order reversed every other slice), so load from
other processes on the machine weighs on all of them alike; the CPU other processes used during
each cell is printed beside it, and --calm waits (up to that many seconds) for a quiet second
before each cell. Targets: the gateway of this checkout
(or of --code-dir), the gateway of --compare if given, and the bare endpoint. Each checkout's
gateway runs from that directory (its cwd and PYTHONPATH, this virtualenv) against its own
redis-server and bucket, so a refactor that changes keys or scripts cannot disturb the other.

Judged, for the first checkout: its server CPU per request against the bare endpoint's in the same
slices, at 1,000 requests/s on the most processes (CPU_RATIO_TARGET). Reported: every cell's p50,
p99, achieved rate and errors, and its p99 beside the bare endpoint's.

    python -m bench.gateway --mode open [--duration 10 --rates 500,1000 --processes 1,2]
    python -m bench.gateway --mode open --compare /tmp/bunch-before
"""

import asyncio
import contextlib
import gc
import json
import os
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools
import uvloop

from bench.common import AUTH, Contention, Report, bench_stack, cpu_seconds, fmt_ms, percentile, wait_idle
from bench.gateway import CheckoutProcess, bare_ids, checkout_env, run_seconds_key, setup_bunch, start_server
from deploy.processes import ROOT, Process, free_port, python, start_redis, wait_http
from deploy.stack import Stack

B4_OPEN = "4 gateway open loop"
# Judged: what a request costs the server beside the bare endpoint under the same load. Measured
# 1.57 (GET) and 1.89 (POST) on two processes at 1,000/s, 1.5-2.05 across cells and days; 2.5 leaves
# room for that spread and still fails a gateway whose requests grow a third dearer. A p99 near
# saturation moves 3x between runs of the same code on 2 cores (bench/RESULTS.md), so it is
# reported beside the bare one, not judged.
CPU_RATIO_TARGET = 2.5
JUDGED_RATE = 1000.0
MAX_LAG_P99 = 0.005  # more and the generator, not the server, shapes a p99 of tens of milliseconds
SLICE_S = 2.0  # measured seconds per slice
FIRST_WARMUP_S = 1.0
SLICE_WARMUP_S = 0.5
REQUEST_TIMEOUT_S = 10.0
GENERATOR_NICE = -5
CALM_CORES = 0.25


# ------------------------------------------------------------------------------------ generator process


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time, answers parsed by httptools.

    aiohttp's client costs more than twice the CPU per request, which on two cores comes out of the
    servers' share and delays the schedule.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[int] | None = None
        self.reusable = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(exc)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(self.parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionResetError("closed by the server"))

    def fail(self, exc: Exception) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def send(self, request: bytes) -> "asyncio.Future[int]":
        assert self.transport is not None
        self.reusable = False  # until the answer is complete
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.answer


class Pool:
    """Connections to one server process, at most `limit`: a request finding none free waits, and
    that wait counts in its latency, as it would for a client whose requests queue."""

    def __init__(self, base: str, limit: int) -> None:
        self.host, port = base.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.limit = limit
        self.idle: list[Connection] = []
        self.slots = 0  # connections open or being opened
        self.waiting: deque[asyncio.Future[Connection | None]] = deque()

    async def acquire(self) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable:
                return conn
            self.slots -= 1  # closed by the server while idle
        if self.slots < self.limit:
            self.slots += 1
        else:
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            handed = await waiter
            if handed is not None:
                return handed
            # None: a connection closed and its slot passed to this request.
        try:
            _, conn = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        except BaseException:
            self.release(None)
            raise
        return conn

    def release(self, conn: Connection | None) -> None:
        if conn is not None and not conn.reusable and conn.transport is not None:
            conn.transport.close()
        usable = conn if conn is not None and conn.reusable else None
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(usable)
                return
        if usable is not None:
            self.idle.append(usable)
        else:
            self.slots -= 1

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()


def request_bytes(method: str, host: str, path: str, headers: dict[str, str], body: bytes | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def run_slice(spec: dict[str, Any]) -> dict[str, Any]:
    """One slice at spec["rate"]: warm-up, then the measured window; returns what was measured."""
    rate, expect, pids = float(spec["rate"]), int(spec["expect"]), spec["pids"]
    body = spec["body"].encode() if spec["body"] is not None else None
    pools = [Pool(base, spec["connections"]) for base in spec["bases"]]
    requests = [
        [
            request_bytes(spec["method"], base.removeprefix("http://"), path, spec["headers"], body)
            for path in spec["paths"]
        ]
        for base in spec["bases"]
    ]
    latencies: list[float] = []
    lags: list[float] = []
    errors: Counter[str] = Counter()
    answered = 0
    total = int(rate * (spec["warmup"] + spec["duration"]))
    t0 = time.perf_counter() + 0.01
    measure_from = t0 + spec["warmup"]
    stop_at = measure_from + spec["duration"]

    async def one(i: int, scheduled: float) -> None:
        nonlocal answered
        started = time.perf_counter()
        pool, choices = pools[i % len(pools)], requests[i % len(pools)]
        conn = None
        try:
            conn = await pool.acquire()
            status = await conn.send(choices[0] if len(choices) == 1 else random.choice(choices))
            outcome = "" if status == expect else f"HTTP {status}"
        except (OSError, httptools.HttpParserError) as exc:
            outcome = type(exc).__name__
        except asyncio.CancelledError:
            outcome = f"no answer within {REQUEST_TIMEOUT_S:.0f} s"
        finally:
            # Without a connection there is no slot to give back: a failed connect gave its own back.
            if conn is not None:
                pool.release(conn)
        done = time.perf_counter()
        if measure_from <= done <= stop_at and not outcome:
            answered += 1
        if scheduled >= measure_from:
            latencies.append(done - scheduled)
            lags.append(started - scheduled)
            if outcome:
                errors[outcome] += 1

    def mark() -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), sum(cpu_seconds(pid) for pid in pids)

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    start: tuple[float, float, float] | None = None
    gc.disable()  # a collection of the generator's garbage would show up as send lag
    try:
        i = 0
        while i < total:
            now = time.perf_counter()
            if start is None and now >= measure_from:
                start = mark()
            # Everything due by now goes out at once: a late wake-up delays requests, never drops them.
            while i < total and t0 + i / rate <= now:
                task = loop.create_task(one(i, t0 + i / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            # uvloop's timers count whole milliseconds, rounding down: a shorter sleep returns at
            # once, and the loop would spin until the next request is due.
            await asyncio.sleep(max(0.001, t0 + i / rate - time.perf_counter()))
        await asyncio.sleep(stop_at - time.perf_counter())
        end = mark()
        # One deadline for the stragglers rather than a timer per request.
        _, late = await asyncio.wait(list(tasks), timeout=REQUEST_TIMEOUT_S) if tasks else (set(), set())
        for task in late:
            task.cancel()
        await asyncio.gather(*late)
    finally:
        for pool in pools:
            pool.close()
        gc.enable()
        gc.collect()
    assert start is not None
    window = end[0] - start[0]
    return {
        "latencies": latencies,
        "lags": lags,
        "errors": dict(errors),
        "answered": answered,
        "window": window,
        "client_cpu": end[1] - start[1],
        "server_cpu": end[2] - start[2],
    }


def worker_main() -> None:
    """The generator process: one JSON slice spec per line on stdin, one JSON result per line on stdout."""
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, GENERATOR_NICE)
    for line in sys.stdin:
        result = uvloop.run(run_slice(json.loads(line)))
        result["nice"] = os.getpriority(os.PRIO_PROCESS, 0)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


class Generator:
    """The coordinator's handle on the generator process; the coordinator only waits meanwhile."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.nice = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *python("-m", "bench.open_loop", "--worker"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=1 << 26,  # a slice's latencies come back as one line
        )

    async def run(self, spec: dict[str, Any]) -> "OpenLoad":
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(spec).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result = json.loads(line)
        self.nice = result.pop("nice")
        return OpenLoad(rate=spec["rate"], errors=Counter(result.pop("errors")), **result)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            await self.proc.wait()


# ------------------------------------------------------------------------------------ figures


@dataclass
class OpenLoad:
    rate: float
    latencies: list[float]
    lags: list[float]
    errors: Counter[str]
    answered: int
    window: float
    client_cpu: float  # seconds
    server_cpu: float  # seconds
    other: float = float("nan")  # cores other processes used meanwhile

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def lag_p99(self) -> float:
        return percentile(self.lags, 0.99)

    @property
    def achieved(self) -> float:
        return self.answered / self.window

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def kept_schedule(self) -> bool:
        return self.lag_p99 <= MAX_LAG_P99

    @property
    def cpu_per_request(self) -> float:
        return self.server_cpu / self.answered if self.answered else float("nan")

    def line(self) -> str:
        errors = ", ".join(f"{n} {kind}" for kind, n in self.errors.items()) or "0 errors"
        behind = "" if self.kept_schedule else "  GENERATOR BEHIND: its own delay is part of these latencies"
        return (
            f"p50 {fmt_ms(self.p50)}, p99 {fmt_ms(self.p99)}, {self.achieved:.0f}/{self.rate:.0f} req/s, {errors}; "
            f"server {self.server_cpu / self.window:.2f} cores ({self.cpu_per_request * 1e6:.0f} us/request), "
            f"generator {self.client_cpu / self.window:.2f} cores, send lag p99 {fmt_ms(self.lag_p99)} "
            f"max {fmt_ms(max(self.lags, default=float('nan')))}; other load {self.other:.2f} cores{behind}"
        )

    @staticmethod
    def merge(slices: list["OpenLoad"]) -> "OpenLoad":
        return OpenLoad(
            rate=slices[0].rate,
            latencies=[x for s in slices for x in s.latencies],
            lags=[x for s in slices for x in s.lags],
            errors=sum((s.errors for s in slices), Counter()),
            answered=sum(s.answered for s in slices),
            window=sum(s.window for s in slices),
            client_cpu=sum(s.client_cpu for s in slices),
            server_cpu=sum(s.server_cpu for s in slices),
        )


# ------------------------------------------------------------------------------------ targets


@dataclass
class Target:
    """One app under test: its server processes (all started, the first n used) and its requests."""

    name: str
    procs: list[Process]
    urls: list[str]
    paths: dict[str, list[str]]
    body: str
    headers: dict[str, str] = field(default_factory=lambda: dict(AUTH))

    def spec(self, route: str, processes: int, rate: float, warmup: float, duration: float, connections: int) -> dict:
        return {
            "rate": rate,
            "method": route,
            "expect": 202 if route == "POST" else 200,
            "bases": self.urls[:processes],
            "paths": self.paths[route],
            "body": self.body if route == "POST" else None,
            "headers": self.headers,
            "pids": [p.popen.pid for p in self.procs[:processes] if p.popen is not None],
            "connections": connections,
            "warmup": warmup,
            "duration": duration,
        }


async def start_bunch(stack: Stack, name: str, code_dir: Path, replicas: int, owned: list[Process]) -> Target:
    """`replicas` gateway processes of the checkout in `code_dir`, on their own redis-server and bucket."""
    redis_url = stack.redis_url
    if name != "A":
        redis_dir = stack.workdir / f"redis-{name}"
        redis_dir.mkdir()
        redis, redis_url = start_redis(redis_dir)
        owned.append(redis)
    env = {**stack.service_env, "BUNCH_REDIS_URL": redis_url, "BUNCH_S3_BUCKET": f"bunch-bench-{name.lower()}"}
    procs: list[Process] = []
    urls: list[str] = []
    for replica in range(replicas):
        port = free_port()
        label = f"gateway-{name}-{replica}"
        proc = CheckoutProcess(
            label,
            python("-m", "services.gateway", "--host", "127.0.0.1", "--port", str(port)),
            checkout_env({**env, "BUNCH_CONSUMER_NAME": label}, code_dir),
            stack.workdir / f"{label}.log",
            cwd=code_dir,
        ).start()
        owned.append(proc)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        procs.append(proc)
        urls.append(f"http://127.0.0.1:{port}")
    wait_idle([p.popen.pid for p in procs if p.popen is not None], timeout=30)
    body, ids = await setup_bunch(redis_url, urls[0], run_seconds_key(code_dir))
    paths = {"GET": [f"/api/jobs/{i}/status" for i in ids], "POST": ["/api/jobs"]}
    return Target(name, procs, urls, paths, json.dumps(body))


async def start_bare(stack: Stack, replicas: int, body: str, owned: list[Process]) -> Target:
    procs, urls = [], []
    for replica in range(replicas):
        proc, url = start_server(stack, "uvicorn", "bare_app", label=f"bare-{replica}")
        owned.append(proc)
        procs.append(proc)
        urls.append(url)
    ids = await bare_ids(urls[0])
    return Target("bare", procs, urls, {"GET": [f"/bare/jobs/{i}" for i in ids], "POST": ["/bare/jobs"]}, body)


# ------------------------------------------------------------------------------------ the benchmark


Results = dict[tuple[str, int, float, str], OpenLoad]


async def calm(max_wait: float) -> None:
    """Wait, up to `max_wait` seconds, for a second in which other processes used under CALM_CORES."""
    deadline = time.monotonic() + max_wait
    while True:
        window = Contention()
        await asyncio.sleep(1.0)
        other, _ = window.foreign_cores()
        if other < CALM_CORES:
            return
        if time.monotonic() >= deadline:
            print(f"    the machine stayed busy ({other:.2f} cores of other processes): measuring anyway", flush=True)
            return


async def measure(
    targets: list[Target], generator: Generator, args: Any, counts: list[int], rates: list[float]
) -> Results:
    results: Results = {}
    slices = max(1, round(args.duration / SLICE_S))
    for route in ("GET", "POST"):
        for n in counts:
            for rate in rates:
                if args.calm:
                    await calm(args.calm)
                contention = Contention()
                measured: dict[str, list[OpenLoad]] = {t.name: [] for t in targets}
                for k in range(slices):
                    warmup = FIRST_WARMUP_S if k == 0 else SLICE_WARMUP_S
                    for target in targets if k % 2 == 0 else targets[::-1]:
                        spec = target.spec(route, n, rate, warmup, args.duration / slices, args.connections)
                        measured[target.name].append(await generator.run(spec))
                other, _ = contention.foreign_cores()
                for name, loads in measured.items():
                    results[route, n, rate, name] = merged = OpenLoad.merge(loads)
                    merged.other = other
                    print(f"    {route:4} {rate:5.0f}/s {n} proc  {name:5} {merged.line()}", flush=True)
    return results


def judge(report: Report, results: Results, targets: list[Target], counts: list[int], rates: list[float]) -> None:
    names = [t.name for t in targets]
    for (route, n, rate, name), load in results.items():
        errors = load.error_count
        value = f"{fmt_ms(load.p50)} / {fmt_ms(load.p99)}; {load.achieved:.0f} req/s, {errors} err"
        value += f", lag p99 {fmt_ms(load.lag_p99)}, other load {load.other:.2f} cores"
        report.add(B4_OPEN, f"{route} {rate:.0f}/s, {n} proc: {name} p50 / p99", value)
    rate = JUDGED_RATE if JUDGED_RATE in rates else max(rates)
    most = max(counts)
    for route in ("GET", "POST"):
        for n in counts:
            cpu = " / ".join(f"{results[route, n, rate, name].cpu_per_request * 1e6:.0f}" for name in names)
            report.add(B4_OPEN, f"{route} {rate:.0f}/s, {n} proc: server CPU/request {' / '.join(names)}", f"{cpu} us")
            ours, bare = results[route, n, rate, "A"], results[route, n, rate, "bare"]
            report.add(
                B4_OPEN,
                f"{route} {rate:.0f}/s, {n} proc: p99 A / bare",
                f"{fmt_ms(ours.p99)} / {fmt_ms(bare.p99)} = {ours.p99 / bare.p99:.1f}; "
                f"errors {ours.error_count} / {bare.error_count}",
            )
        ours, bare = results[route, most, rate, "A"], results[route, most, rate, "bare"]
        ratio = ours.cpu_per_request / bare.cpu_per_request
        report.add(
            B4_OPEN,
            f"{route} {rate:.0f}/s, {most} proc: server CPU per request, A / bare",
            f"{ratio:.2f}",
            f"≤ {CPU_RATIO_TARGET:.1f}",
            ratio <= CPU_RATIO_TARGET,
        )


async def main_async(args: Any) -> int:
    report = Report(args)
    counts = sorted({int(c) for c in args.processes.split(",") if c})
    rates = [float(r) for r in args.rates.split(",") if r]
    sides: dict[str, Path] = {"A": args.code_dir or ROOT}
    if args.compare:
        sides["B"] = args.compare
    load_before = os.getloadavg()
    print(
        f"gateway open loop: rates {rates} req/s, {counts} server processes, {args.duration:.0f} s per cell, "
        f"{args.connections} connections per process; "
        + ", ".join(f"{name} = {path}" for name, path in sides.items())
        + f"; load average {load_before[0]:.2f}",
        flush=True,
    )
    owned: list[Process] = []
    generator = Generator()
    with bench_stack("gateway-open", services=(), keep=args.keep) as stack:
        for name in ("runpod", "gemini"):
            stack.processes[name].stop()  # not used here
        try:
            targets = [await start_bunch(stack, name, path, max(counts), owned) for name, path in sides.items()]
            targets.append(await start_bare(stack, max(counts), targets[0].body, owned))
            await generator.start()
            results = await measure(targets, generator, args, counts, rates)
        finally:
            await generator.stop()
            for proc in reversed(owned):
                proc.stop()
    load_after = os.getloadavg()
    judge(report, results, targets, counts, rates)
    lines = [
        f"- {route} {rate:.0f}/s, {n} proc, {name}: {load.line()}" for (route, n, rate, name), load in results.items()
    ]
    behind = [key for key, load in results.items() if not load.kept_schedule]
    if behind:
        print(
            f"  the generator's send lag p99 was over {fmt_ms(MAX_LAG_P99)} in {len(behind)} cells: their latencies "
            "include its own delay (a p99 under the target still holds; one over it may be the generator's)",
            flush=True,
        )
    report.note(
        B4_OPEN,
        f"""Open loop (bench/open_loop.py): arrivals at a fixed rate, latency from each request's scheduled
send time, so client-side and server-side queueing both count. One generator process (uvloop, a
minimal keep-alive HTTP/1.1 client on httptools, up to {args.connections} connections per server
process, nice {generator.nice});
{args.duration:.0f} s per route, rate, process count and target, in alternating slices of about
{SLICE_S:.0f} s after a warm-up.
Targets: {", ".join(f"{name} = `python -m services.gateway` from {path}" for name, path in sides.items())};
bare = bench/serve_app.py under uvicorn. N processes = N replicas on their own ports, requests spread
over them in turn. GET status asks for a random one of the set-up backlog's queued jobs; POST creates
a semi_auto job of 40 images with one reference.
Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}.

{chr(10).join(lines)}""",
    )
    return report.finish([B4_OPEN])


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        sys.exit("run the benchmark with `python -m bench.gateway --mode open`")
