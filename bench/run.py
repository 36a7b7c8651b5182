"""Run every benchmark, one process each; exit 1 if any missed a target or failed.

    python -m bench [--only dispatch,scale] [--results PATH] [--no-record]
    python -m bench --smoke [--parallel 3]

Every judged target is a ratio against a baseline measured side by side in the same run, so a
verdict does not depend on the CPU it was measured on; absolute figures are printed and recorded
beside them, not judged. --smoke runs every benchmark at a tiny size (SMOKE), several at once, in
about a minute: it checks that each still runs from start to end and judges nothing.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import RESULTS, Contention, machine, machine_type

BENCHMARKS = [
    "dispatch",
    "packaging",
    "gateway",
    "scale",
    "e2e",
    "tenants",
    "memory",
    "redis_wait",
    "worker_seconds",
    "lanes",
    "exports",
]
# Sizes that exercise every phase of a benchmark (each baseline included) in seconds, not minutes.
SMOKE = {
    "dispatch": "--runs 40 --jobs 2 --workers 10 --sleep-ms 50",
    "packaging": "--size-mb 20 --small-mb 10 --large-mb 30 --reps 1",
    "gateway": "--duration 0.5 --rates 200 --processes 1 --servers uvicorn --clients 20",
    "scale": "--inputs 200 --small-inputs 20 --jobs 1 --status-calls 5",
    "e2e": "--images 16 --jobs 1 --workers 4 --no-profile",
    "tenants": "",
    "memory": "",
    "redis_wait": "--runs 40 --rounds 1 --stall-seconds 0.5",
    "worker_seconds": "--images 8 --workers 2 --latency-ms 100 --jitter-ms 100",
    "lanes": "--inputs 4 --variations 1 --workers 2 --latency-ms 50 --jitter-ms 50 --batch-seconds 1",
    "exports": "--objects 8 --object-kb 64 --reps 1 --small 8 --large 40 --job-images 8 --groups 2",
}


def command_of(name: str, args: argparse.Namespace) -> list[str]:
    extra = ["--results", args.results] + ([] if args.record else ["--no-record"])
    if args.smoke:
        extra = ["--smoke", "--no-record", *SMOKE[name].split()]
    return [sys.executable, "-m", f"bench.{name}", *extra]


def run_one(name: str, args: argparse.Namespace) -> tuple[int, float, str]:
    """(exit code, seconds, output): in smoke mode the output is held so parallel runs do not mix."""
    cmd = command_of(name, args)
    started = time.monotonic()
    if args.smoke:
        done = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.returncode, time.monotonic() - started, done.stdout
    print(f"\n=== bench.{name} {' '.join(cmd[3:])}", flush=True)
    code = subprocess.run(cmd, check=False).returncode
    return code, time.monotonic() - started, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every benchmark at a tiny size, nothing judged")
    parser.add_argument("--parallel", type=int, default=3, help="smoke: benchmarks run at once")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b] or BENCHMARKS
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    print(f"machine: {machine()} (results filed under '{machine_type()}')", flush=True)
    print(f"load average before: {' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)", flush=True)
    began, contention = time.monotonic(), Contention()
    outcome: dict[str, tuple[int, float]] = {}
    if args.smoke:
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            futures = {name: pool.submit(run_one, name, args) for name in chosen}
            for name, future in futures.items():
                code, seconds, output = future.result()
                outcome[name] = (code, seconds)
                print(f"\n=== bench.{name} --smoke: exit {code} after {seconds:.0f} s", flush=True)
                print(output.rstrip() if code else "\n".join(output.rstrip().splitlines()[-3:]), flush=True)
    else:
        for name in chosen:
            code, seconds, _ = run_one(name, args)
            outcome[name] = (code, seconds)
            print(f"=== bench.{name}: exit {code} after {seconds:.0f} s", flush=True)
    print("\n" + ", ".join(f"{name}: {'ok' if code == 0 else f'exit {code}'}" for name, (code, _) in outcome.items()))
    print(f"machine: {machine()}; other load over the whole run: {contention.describe()}", flush=True)
    print(f"wall time {time.monotonic() - began:.0f} s", flush=True)
    if args.record and not args.smoke:
        print(f"results: {args.results}")
    sys.exit(0 if all(code == 0 for code, _ in outcome.values()) else 1)


if __name__ == "__main__":
    main()
