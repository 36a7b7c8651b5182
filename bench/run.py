"""Run every benchmark, one process each, in order; exit 1 if any missed a target or failed.

    python -m bench [--quick] [--only dispatch,scale] [--results PATH] [--no-record]

--quick runs small sizes (to check the harness, not to quote); the targets hold for the full sizes.
"""

import argparse
import subprocess
import sys
import time

from bench.common import RESULTS

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
QUICK = {
    "dispatch": ["--runs", "400", "--jobs", "4"],
    "packaging": ["--size-mb", "100", "--small-mb", "40", "--large-mb", "120", "--reps", "1"],
    "gateway": ["--duration", "3"],
    "scale": ["--inputs", "2000", "--jobs", "1", "--status-calls", "20"],
    "e2e": ["--images", "80", "--jobs", "2"],
    "tenants": ["--quick"],
    "memory": ["--quick"],
    "redis_wait": ["--runs", "400", "--rounds", "2", "--stall-seconds", "2"],
    "worker_seconds": ["--images", "64", "--latency-ms", "500", "--jitter-ms", "1000"],
    "lanes": ["--inputs", "20", "--variations", "2", "--batch-seconds", "2"],
    "exports": ["--objects", "80", "--large", "1000", "--reps", "1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the harness")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b] or BENCHMARKS
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks: {', '.join(sorted(unknown))}")
    outcome: dict[str, int] = {}
    for name in chosen:
        extra = ["--results", args.results] + ([] if args.record else ["--no-record"])
        extra += QUICK[name] if args.quick else []
        print(f"\n=== bench.{name} {' '.join(extra)}", flush=True)
        started = time.monotonic()
        outcome[name] = subprocess.run([sys.executable, "-m", f"bench.{name}", *extra], check=False).returncode
        print(f"=== bench.{name}: exit {outcome[name]} after {time.monotonic() - started:.0f} s", flush=True)
    print("\n" + ", ".join(f"{name}: {'ok' if rc == 0 else f'exit {rc}'}" for name, rc in outcome.items()))
    if args.record:
        print(f"results: {args.results}")
    sys.exit(0 if all(rc == 0 for rc in outcome.values()) else 1)


if __name__ == "__main__":
    main()
