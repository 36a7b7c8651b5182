"""Load: 200 concurrent clients for 60 s against the gateway on loopback, mixing what real clients do.

    python -m bench.load [--clients 200 --duration 60 --mix submit=1,status=4,results=3,sse=2]
    python -m bench.load --url http://127.0.0.1:8000 --key dev-key      (a stack already running)

Without --url it starts the whole real stack (deploy/stack.py: redis-server, moto's S3 server, the
RunPod and Gemini emulators, gateway, dispatcher and packager, each its own process) and stops it
at the end. Each client loops, choosing by weight one of

    submit   POST /api/jobs                   a semi-auto job of 1-4 images (202)
    status   GET  /api/jobs/{id}/status       of a random known job (200)
    results  GET  /api/jobs/{id}/results      of a random known job (200)
    sse      GET  /api/jobs/{id}/events       time to the first event (200); the stream is then read
                                              until the job ends or --sse-hold seconds passed

over jobs seeded before the clock starts (some finished, some queued) and the ones it submits.
Bounded: it stops sending after --duration, gives up on what is still in flight after --grace,
and never sends more than --max-requests. It prints requests, errors, p50/p95/p99 latency per kind
and the throughput, and exits 1 on any error (a status other than the expected one, a timeout, a
connection failure).
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from deploy.processes import scratch_dir
from deploy.stack import DEV_API_KEY, DEV_PROJECT, Stack, start_stack
from shared.models import FINAL_STATUS_VALUES
from tests.stack_helpers import png_bytes

KINDS = ("submit", "status", "results", "sse")
EXPECTED = {"submit": 202, "status": 200, "results": 200, "sse": 200}


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    sent: int = 0
    in_window: int = 0  # answered before the end of --duration

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{kind}: {what}")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {name!r}; kinds: {', '.join(KINDS)}")
        mix[name] = float(weight)
    return mix


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Load:
    def __init__(self, url: str, key: str, args: argparse.Namespace, watch: dict[str, int] | None = None) -> None:
        self.url = url
        self.args = args
        self.watch = watch or {}  # process name -> pid, whose CPU use is reported
        self.cpu: dict[str, float] = {}  # cores used on average during the load
        self.headers = {"Authorization": f"Bearer {key}"}
        self.jobs: list[str] = []
        self.tally = Tally()
        self.kinds = list(args.mix)
        self.weights = [args.mix[kind] for kind in self.kinds]
        self.reference = ""

    # --- setup, before the clock starts ---

    async def seed(self, session: aiohttp.ClientSession) -> None:
        form = aiohttp.FormData()
        form.add_field("files", png_bytes(48, 48, seed=4), filename="ref.png", content_type="image/png")
        async with session.post(f"{self.url}/api/uploads", data=form) as response:
            assert response.status == 201, await response.text()
            self.reference = (await response.json())["uploads"][0]["id"]
        for _ in range(self.args.seed_jobs):
            async with session.post(f"{self.url}/api/jobs", json=self.job_body()) as response:
                assert response.status == 202, await response.text()
                self.jobs.append((await response.json())["id"])
        # Let part of them finish, so results and event streams see finished jobs too.
        deadline = time.monotonic() + self.args.seed_wait
        while time.monotonic() < deadline:
            done = 0
            for job_id in self.jobs[:10]:
                async with session.get(f"{self.url}/api/jobs/{job_id}/status") as response:
                    done += (await response.json())["status"] in FINAL_STATUS_VALUES
            if done == min(10, len(self.jobs)):
                break
            await asyncio.sleep(0.5)

    def job_body(self) -> dict[str, Any]:
        return {
            "mode": "semi_auto",
            "group": "load",
            "prompts": [f"load test {random.randrange(1000)}"],
            "reference_ids": [self.reference],
            "images_per_prompt": random.randint(1, 4),
        }

    # --- the clients ---

    async def client(self, session: aiohttp.ClientSession, stop_at: float) -> None:
        while time.perf_counter() < stop_at and self.tally.sent < self.args.max_requests:
            kind = random.choices(self.kinds, self.weights)[0]
            self.tally.sent += 1
            started = time.perf_counter()
            try:
                latency = await asyncio.wait_for(getattr(self, kind)(session, started), self.args.timeout)
            except TimeoutError:
                self.tally.error(kind, f"no answer within {self.args.timeout}s")
                continue
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                self.tally.error(kind, f"{type(exc).__name__}: {exc}")
                continue
            if latency is not None:
                self.tally.latencies[kind].append(latency)
                self.tally.in_window += time.perf_counter() <= stop_at

    async def _simple(self, session: aiohttp.ClientSession, kind: str, method: str, path: str, **kw: Any) -> Any:
        started = time.perf_counter()
        async with session.request(method, f"{self.url}{path}", **kw) as response:
            body = await response.read()
        latency = time.perf_counter() - started
        if response.status != EXPECTED[kind]:
            self.tally.error(kind, f"{method} {path} -> {response.status} {body[:200]!r}")
            return None, None
        return latency, body

    async def submit(self, session: aiohttp.ClientSession, _: float) -> float | None:
        latency, body = await self._simple(session, "submit", "POST", "/api/jobs", json=self.job_body())
        if body is not None:
            self.jobs.append(json.loads(body)["id"])
        return latency

    async def status(self, session: aiohttp.ClientSession, _: float) -> float | None:
        latency, _body = await self._simple(session, "status", "GET", f"/api/jobs/{random.choice(self.jobs)}/status")
        return latency

    async def results(self, session: aiohttp.ClientSession, _: float) -> float | None:
        path = f"/api/jobs/{random.choice(self.jobs)}/results"
        latency, _body = await self._simple(session, "results", "GET", path)
        return latency

    async def sse(self, session: aiohttp.ClientSession, started: float) -> float | None:
        path = f"/api/jobs/{random.choice(self.jobs)}/events"
        first: float | None = None
        async with session.get(f"{self.url}{path}", timeout=aiohttp.ClientTimeout(total=None)) as response:
            if response.status != 200:
                self.tally.error("sse", f"GET {path} -> {response.status}")
                return None
            with contextlib.suppress(TimeoutError):
                # Up to --timeout for the first event, then up to --sse-hold more (pings are comments).
                async with asyncio.timeout(self.args.timeout) as deadline:
                    async for line in response.content:
                        if not line.startswith(b"data:"):
                            continue
                        if first is None:
                            first = time.perf_counter() - started
                            deadline.reschedule(asyncio.get_running_loop().time() + self.args.sse_hold)
                        if json.loads(line[5:]).get("status") in FINAL_STATUS_VALUES:
                            break  # the stream ends after a final status anyway
        if first is None:
            self.tally.error("sse", f"GET {path}: no event")
        return first

    async def run(self) -> float:
        connector = aiohttp.TCPConnector(limit=self.args.clients + 10, limit_per_host=self.args.clients + 10)
        timeout = aiohttp.ClientTimeout(total=self.args.timeout)
        async with aiohttp.ClientSession(connector=connector, headers=self.headers, timeout=timeout) as session:
            await self.seed(session)
            started = time.perf_counter()
            stop_at = started + self.args.duration
            cpu_task = asyncio.create_task(self.measure_cpu(self.args.duration))
            clients = [asyncio.create_task(self.client(session, stop_at)) for _ in range(self.args.clients)]
            _done, late = await asyncio.wait(clients, timeout=self.args.duration + self.args.grace)
            for task in late:
                task.cancel()
            if late:
                self.tally.error("run", f"{len(late)} clients still busy {self.args.grace}s after the end")
            await cpu_task
            return time.perf_counter() - started

    async def measure_cpu(self, seconds: float) -> None:
        def sample() -> dict[str, float]:
            found = {"load client": time.process_time()}
            for name, pid in self.watch.items():
                with contextlib.suppress(OSError):
                    found[name] = cpu_seconds(pid)
            return found

        before = sample()
        await asyncio.sleep(seconds)
        after = sample()
        self.cpu = {name: (after[name] - before[name]) / seconds for name in before if name in after}


def report(load: Load, seconds: float, args: argparse.Namespace) -> str:
    tally = load.tally
    total = sum(len(values) for values in tally.latencies.values())
    lines = [
        f"bench/load.py: {args.clients} clients, {args.duration:.0f} s, mix "
        + ", ".join(f"{k}={v:g}" for k, v in args.mix.items())
        + f", SSE held up to {args.sse_hold:g} s",
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, loopback; the machine may be shared with other work",
        "",
        f"{'kind':<8} {'requests':>9} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for kind in KINDS:
        values = tally.latencies[kind]
        cells = [percentile(values, q) * 1000 for q in (0.5, 0.95, 0.99, 1.0)]
        lines.append(
            f"{kind:<8} {len(values):>9} {tally.errors[kind]:>7} " + " ".join(f"{cell:>8.1f}" for cell in cells)
        )
    errors = sum(tally.errors.values())
    lines += [
        "",
        f"total    {total:>9} {errors:>7}   throughput {tally.in_window / args.duration:.0f} req/s "
        f"({tally.in_window} answered within the {args.duration:.0f} s; the last ones by {seconds:.1f} s)",
        f"sse latency is the time to the first event; jobs known at the end: {len(load.jobs)}",
    ]
    if load.cpu:
        lines.append("CPU, cores on average: " + ", ".join(f"{name} {cores:.2f}" for name, cores in load.cpu.items()))
    if tally.error_samples:
        lines += ["", "first errors:", *(f"  {sample}" for sample in tally.error_samples)]
    return "\n".join(lines)


@contextlib.contextmanager
def local_stack(args: argparse.Namespace) -> Iterator[Stack]:
    workdir = scratch_dir("bunch-load-")
    stack = start_stack(
        workdir,
        runpod_workers=8,
        service_env={"BUNCH_MAX_CONCURRENCY": "8", "BUNCH_WEBHOOK_GRACE_SECONDS": "5"},
    )
    try:
        yield stack
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("submit=1,status=4,results=3,sse=2"))
    parser.add_argument("--sse-hold", type=float, default=2.0, help="seconds an event stream is read at most")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one request may take")
    parser.add_argument("--grace", type=float, default=40.0, help="seconds in-flight requests get after the end")
    parser.add_argument("--max-requests", type=int, default=2_000_000)
    parser.add_argument("--seed-jobs", type=int, default=40)
    parser.add_argument("--seed-wait", type=float, default=30.0, help="seconds to wait for seed jobs to finish")
    parser.add_argument("--url", help="a running gateway (default: start the whole stack here)")
    parser.add_argument("--key", default=DEV_API_KEY, help=f"API key (the stack's is {DEV_API_KEY!r})")
    parser.add_argument("--keep", action="store_true", help="keep the stack's data folder")
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    def go(url: str, watch: dict[str, int] | None = None) -> tuple[Load, float]:
        load = Load(url, args.key, args, watch)
        return load, asyncio.run(load.run())

    if args.url:
        load, seconds = go(args.url.rstrip("/"))
    else:
        with local_stack(args) as stack:
            print(f"stack up: gateway {stack.gateway_url} (project {DEV_PROJECT!r})", flush=True)
            pids = {name: proc.popen.pid for name, proc in stack.processes.items() if proc.popen is not None}
            load, seconds = go(stack.gateway_url, pids)
    print(report(load, seconds, args), flush=True)
    return 1 if sum(load.tally.errors.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
