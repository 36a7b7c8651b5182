"""Benchmark 4: the gateway's POST /api/jobs and GET /api/jobs/{id}/status, closed and open loop.

Open loop (judged; bench/open_loop.py describes it): requests arrive at a fixed rate, 500 and
1,000 per second, and latency runs from each request's scheduled send time, on one and two gateway
processes, beside the bare endpoint; judged: server CPU per request against the bare endpoint's;
`--code-dir` and `--compare` measure other checkouts.

Closed loop (reported): 200 concurrent aiohttp clients (one uvloop process, keep-alive, loopback)
each send the next request as soon as the previous one answered, for --duration seconds per route
and app. Its latency is clients / throughput (Little's law), not the service's, and its throughput
against the bare endpoint's is the cost per request the open loop judges, seen another way. The
same load against a bare FastAPI app doing one Redis SET (POST) or GET (GET) under the same server
and flags (bench/serve_app.py), side by side: both apps run at once and are measured in alternating
slices (each after a short warm-up), so load from other processes on the machine weighs on both
alike rather than on whichever ran while it lasted. Servers: uvicorn (uvloop + httptools, the
gateway's default) and granian (ASGI, uvloop), one worker process each.

    python -m bench.gateway [--mode open|closed|both] [--duration 10]
    python -m bench.gateway --mode open [--rates 500,1000 --processes 1,2 --compare /tmp/bunch-before]
    python -m bench.gateway --mode closed [--clients 200 --servers uvicorn,granian]
"""

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from redis.asyncio import Redis

from bench.common import (
    AUTH,
    Report,
    bench_stack,
    fmt_ms,
    fmt_pct,
    parser,
    percentile,
    png_bytes,
    tree_cpu_seconds,
    wait_idle,
)
from deploy.processes import ROOT, Process, base_env, free_port, python, wait_http
from deploy.stack import Stack

B4 = "4 gateway"
BACKLOG_JOBS = 200
GRANIAN = Path(sys.executable).with_name("granian")
HAVE_GRANIAN = GRANIAN.exists()


@dataclass
class Load:
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    client_cpu: float  # cores
    server_cpu: float  # cores

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per answered request: what the server costs, however busy the machine."""
        return self.server_cpu * self.seconds / self.requests if self.requests else float("nan")

    def line(self) -> str:
        return (
            f"{self.rps:.0f} req/s, p50 {self.p50 * 1000:.1f} ms, p99 {self.p99 * 1000:.1f} ms, "
            f"{self.errors} errors; server {self.server_cpu:.2f} cores ({self.cpu_per_request * 1e6:.0f} us "
            f"CPU/request), load client {self.client_cpu:.2f} cores"
        )

    @staticmethod
    def merge(slices: list["Load"]) -> "Load":
        seconds = sum(s.seconds for s in slices)
        return Load(
            requests=sum(s.requests for s in slices),
            errors=sum(s.errors for s in slices),
            seconds=seconds,
            latencies=[latency for s in slices for latency in s.latencies],
            client_cpu=sum(s.client_cpu * s.seconds for s in slices) / seconds,
            server_cpu=sum(s.server_cpu * s.seconds for s in slices) / seconds,
        )


@dataclass
class CheckoutProcess(Process):
    """A Process run from another checkout of the repository (Process.start always uses this one)."""

    cwd: Path = ROOT

    def start(self) -> "CheckoutProcess":
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self


def checkout_env(extra: dict[str, str], code_dir: Path) -> dict[str, str]:
    # `python -m` puts the cwd first on sys.path; PYTHONPATH makes any subprocess it starts agree.
    return base_env({**extra, "PYTHONPATH": str(code_dir)})


def run_seconds_key(code_dir: Path) -> str:
    """The run-time average's key as that checkout names it: a refactor may rename keys."""
    out = subprocess.run(
        python("-c", "from shared import keys; print(keys.RUN_SECONDS)"),
        cwd=code_dir,
        env=checkout_env({}, code_dir),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def start_server(stack: Stack, server: str, app: str, label: str = "", code_dir: Path = ROOT) -> tuple[Process, str]:
    port = free_port()
    target = f"bench.serve_app:{app}"
    if server == "uvicorn":
        args = python(
            "-m", "uvicorn", "--factory", target, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
            "--backlog", "2048",
        )  # fmt: skip
    else:
        args = [
            str(GRANIAN), "--interface", "asgi", "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--loop", "uvloop", "--no-ws", "--log-level", "warning", "--no-access-log",
            "--backlog", "2048", target,
        ]  # fmt: skip
    label = label or f"{server}-{app}"
    env = checkout_env(stack.service_env, code_dir)
    proc = CheckoutProcess(label, args, env, stack.workdir / f"{label}.log", cwd=code_dir).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/openapi.json", proc)
    assert proc.popen is not None
    wait_idle([proc.popen.pid], timeout=30)
    return proc, url


async def load(
    method: str,
    url: Callable[[], str],
    body: dict[str, Any] | None,
    expect: int,
    clients: int,
    duration: float,
    server_pid: int,
    warmup: float = 1.0,
) -> Load:
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients, force_close=False)
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(connector=connector, headers=AUTH) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + duration
        marks: dict[str, float] = {}

        async def client() -> None:
            nonlocal errors
            while True:
                sent = time.perf_counter()
                if sent >= stop_at:
                    return
                if sent >= measure_from and not marks:
                    marks.update(cpu=time.process_time(), server=tree_cpu_seconds(server_pid), at=sent)
                async with session.request(method, url(), json=body) as resp:
                    await resp.read()
                    status = resp.status
                done = time.perf_counter()
                # Every answer that arrives inside the window counts, whenever it was sent: with
                # latencies near the window's length, counting by send time would drop most of them.
                if measure_from <= done <= stop_at:
                    latencies.append(done - sent)
                    if status != expect:
                        errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = stop_at - marks["at"]
        client_cpu = (time.process_time() - marks["cpu"]) / seconds
        server_cpu = (tree_cpu_seconds(server_pid) - marks["server"]) / seconds
    return Load(len(latencies), errors, seconds, latencies, client_cpu, server_cpu)


async def setup_bunch(redis_url: str, url: str, run_seconds: str) -> tuple[dict[str, Any], list[str]]:
    """One uploaded reference, a backlog of queued jobs to ask the status of, a known run time."""
    async with aiohttp.ClientSession(headers=AUTH) as api:
        form = aiohttp.FormData()
        form.add_field("files", png_bytes(1), filename="ref.png", content_type="image/png")
        async with api.post(f"{url}/api/uploads", data=form) as resp:
            assert resp.status == 201, await resp.text()
            ref = (await resp.json())["uploads"][0]["id"]
        body: dict[str, Any] = {"mode": "semi_auto", "group": "bench", "prompts": ["a fox"], "reference_ids": [ref]}
        body["images_per_prompt"] = 40
        ids = []
        for _ in range(BACKLOG_JOBS):
            async with api.post(f"{url}/api/jobs", json=body) as resp:
                assert resp.status == 202, await resp.text()
                ids.append((await resp.json())["id"])
    redis = Redis.from_url(redis_url, decode_responses=True)
    # As once the first runs have finished: status views then compute an ETA.
    await redis.hset(run_seconds, "avg", 20.0)
    await redis.aclose()
    return body, ids


async def bare_ids(url: str) -> list[str]:
    async with aiohttp.ClientSession() as session:
        ids = []
        for _ in range(BACKLOG_JOBS):
            async with session.post(f"{url}/bare/jobs", json={"mode": "semi_auto"}) as resp:
                ids.append((await resp.json())["id"])
    return ids


SLICE_S = 1.25  # measured seconds per slice; each slice starts with its own warm-up
SLICE_WARMUP_S = 0.5


async def alternate(
    route: str, targets: dict[str, tuple[Callable[[], str], int]], body: dict[str, Any] | None, args: Any
) -> dict[str, Load]:
    """The same route on each app in turn, in slices adding up to --duration per app."""
    slices = max(1, round(args.duration / SLICE_S))
    measured: dict[str, list[Load]] = {name: [] for name in targets}
    for n in range(slices):
        for name, (url, pid) in targets.items():
            warmup = 1.0 if n == 0 else SLICE_WARMUP_S
            expect = 202 if route == "POST" else 200
            measured[name].append(
                await load(route, url, body, expect, args.clients, args.duration / slices, pid, warmup=warmup)
            )
    return {f"{name} {route}": Load.merge(loads) for name, loads in measured.items()}


async def measure_server(stack: Stack, server: str, args: Any, state: dict[str, Any]) -> dict[str, Load]:
    results: dict[str, Load] = {}
    code_dir = args.code_dir or ROOT
    bunch, bunch_url = start_server(stack, server, "bunch_app", code_dir=code_dir)
    try:
        bare, bare_url = start_server(stack, server, "bare_app")
        try:
            assert bunch.popen is not None and bare.popen is not None
            if "body" not in state:
                state["body"], state["ids"] = await setup_bunch(stack.redis_url, bunch_url, run_seconds_key(code_dir))
            body, ids = state["body"], state["ids"]
            bare_keys = await bare_ids(bare_url)
            results |= await alternate(
                "GET",
                {
                    "bunch": (lambda: f"{bunch_url}/api/jobs/{random.choice(ids)}/status", bunch.popen.pid),
                    "bare": (lambda: f"{bare_url}/bare/jobs/{random.choice(bare_keys)}", bare.popen.pid),
                },
                None,
                args,
            )
            results |= await alternate(
                "POST",
                {
                    "bunch": (lambda: f"{bunch_url}/api/jobs", bunch.popen.pid),
                    "bare": (lambda: f"{bare_url}/bare/jobs", bare.popen.pid),
                },
                body,
                args,
            )
        finally:
            bare.stop()
    finally:
        bunch.stop()
    for name, result in results.items():
        print(f"    {server:8} {name:11} {result.line()}", flush=True)
    return results


async def closed_loop(args: Any) -> int:
    report = Report(args)
    servers = [s for s in args.servers.split(",") if s]
    if "granian" in servers and not HAVE_GRANIAN:
        print("granian is not installed (`.venv/bin/pip install granian`): skipped", flush=True)
        servers.remove("granian")
    print(f"gateway: {args.clients} clients, {args.duration:.0f} s per route, servers {servers}", flush=True)
    measured: dict[str, dict[str, Load]] = {}
    with bench_stack("gateway", services=(), keep=args.keep) as stack:
        for name in ("runpod", "gemini"):
            stack.processes[name].stop()  # not used here
        state: dict[str, Any] = {}
        for server in servers:
            measured[server] = await measure_server(stack, server, args, state)

    for server, results in measured.items():
        for route in ("POST", "GET"):
            bunch, bare = results[f"bunch {route}"], results[f"bare {route}"]
            report.add(
                B4,
                f"{server}: {route} Bunch / bare req/s",
                f"{bunch.rps:.0f} / {bare.rps:.0f} = {fmt_pct(bunch.rps / bare.rps)}",
            )
            report.add(
                B4,
                f"{server}: {route} server CPU per request, Bunch / bare",
                f"{bunch.cpu_per_request * 1e6:.0f} / {bare.cpu_per_request * 1e6:.0f} us",
            )
            report.add(B4, f"{server}: {route} Bunch p50 / p99", f"{fmt_ms(bunch.p50)} / {fmt_ms(bunch.p99)}")
            report.add(B4, f"{server}: {route} bare p50 / p99", f"{fmt_ms(bare.p50)} / {fmt_ms(bare.p99)}")
    for route in ("POST", "GET"):
        best = max(measured, key=lambda s: measured[s][f"bunch {route}"].rps)
        bunch, bare = measured[best][f"bunch {route}"], measured[best][f"bare {route}"]
        ratio = bunch.rps / bare.rps
        # Reported: the open loop judges the same cost (server CPU per request against the bare
        # endpoint's) without a fixed client count shaping it.
        report.add(B4, f"best ({best}) {route}: Bunch throughput / bare", fmt_pct(ratio))
        # At a fixed client count the latency is clients / throughput: the open loop's p99 is the one to read.
        report.add(B4, f"best ({best}) {route}: Bunch p99 (closed loop)", fmt_ms(bunch.p99))

    lines = []
    for server, results in measured.items():
        for name, result in results.items():
            lines.append(f"- {server} {name}: {result.line()}")
    report.note(
        B4,
        f"""{args.clients} concurrent clients in one load process (aiohttp on uvloop, keep-alive, loopback), closed
loop, {args.duration:.0f} s per route and app, in alternating slices of about {SLICE_S} s, each after a
warm-up (1 s for the first, {SLICE_WARMUP_S} s for the others); one server worker process each. Bunch POST
/api/jobs: a semi_auto job of 40 images with one uploaded reference in a named group (one script
call checks the reference exists, resolves the group and writes the job); Bunch GET
/api/jobs/{{id}}/status: a random one of {BACKLOG_JOBS} queued jobs, about 100 of them ahead of it (no
dispatcher runs, so they stay queued; the run-time average is set so the status computes an ETA, as
it does once runs have finished; one script call reads the job and its queue figures). Bare: POST
does one SET of the same body, GET one GET (bench/serve_app.py).

{chr(10).join(lines)}

With a closed loop, mean latency = clients / throughput (Little's law): p99 < 50 ms at 200 clients
would need more than 4,000 req/s, so latency is read in the open loop ("4 gateway open loop")
instead; the bare endpoints are listed to show what the server + Redis floor allows on this
machine.""",
    )
    return report.finish([B4])


async def main_async(args: Any) -> int:
    # Imported here: bench.open_loop builds on this module.
    from bench import open_loop

    codes = []
    if args.mode in ("closed", "both"):
        codes.append(await closed_loop(args))
    if args.mode in ("open", "both"):
        codes.append(await open_loop.main_async(args))
    return max(codes)


def checkout(path: str) -> Path:
    return Path(path).resolve()


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--mode", choices=("open", "closed", "both"), default="both", help="open loop is judged")
    p.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per route and app (and rate and count)"
    )
    p.add_argument(
        "--code-dir", type=checkout, help="run the gateway under test from this checkout (default: this one)"
    )
    p.add_argument("--compare", type=checkout, help="open loop: also measure this checkout's gateway, alternating")
    p.add_argument("--rates", default="500,1000", help="open loop: requests per second")
    p.add_argument("--processes", default="1,2", help="open loop: gateway (and bare) server processes")
    p.add_argument("--connections", type=int, default=64, help="open loop: most connections per server process")
    p.add_argument("--calm", type=float, default=0.0, help="open loop: wait up to this long for a quiet machine")
    p.add_argument("--clients", type=int, default=200, help="closed loop")
    p.add_argument("--servers", default="uvicorn,granian", help="closed loop")
    args = p.parse_args()
    sys.exit(uvloop.run(main_async(args)))


if __name__ == "__main__":
    main()
