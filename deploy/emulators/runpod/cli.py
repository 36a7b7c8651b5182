"""Command line and server lifecycle of the RunPod emulator (`python -m deploy.emulators.runpod`).

# the stack: the real runpod SDK running worker/handler.py in 2 worker processes
python -m deploy.emulators.runpod --port 8100 --workers 2 --handler worker/handler.py
# benchmarks: 50 in-process workers of 1 job each, every job sleeping 200 ms
python -m deploy.emulators.runpod --port 8100 --workers 50 --sleep-ms 200 --full-sleep-ms 0
"""

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import uvloop
from aiohttp import web

from deploy.emulators.runpod.api import create_app
from deploy.emulators.runpod.emulator import Emulator
from deploy.emulators.runpod.inprocess import InProcessPool, load_handler, sleep_handler
from deploy.emulators.runpod.limits import Limiter, parse_limit
from deploy.emulators.runpod.model import (
    DEFAULT_EXECUTION_TIMEOUT_MS,
    MIN_EXECUTION_TIMEOUT_MS,
    MIN_TTL_MS,
    RUN_RESULT_TTL_S,
    RUNSYNC_RESULT_TTL_S,
    Config,
    Faults,
)
from deploy.emulators.runpod.workers import ProcessPool

log = logging.getLogger("emulator.runpod")

DEFAULT_SLEEP_MS = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=3, help="workers: processes with --handler, else loops")
    parser.add_argument("--api-key", default=None, help="required Bearer key; any non-empty key if unset")
    parser.add_argument("--endpoint-id", default="local", help="RUNPOD_ENDPOINT_ID of the worker processes")
    work = parser.add_mutually_exclusive_group()
    work.add_argument("--handler", help="worker file whose __main__ calls runpod.serverless.start")
    work.add_argument("--sleep-ms", type=int, help=f"no handler: every job sleeps this long ({DEFAULT_SLEEP_MS})")
    parser.add_argument(
        "--worker-processes", type=int, help="with --handler: this many `python <handler>` workers (default --workers)"
    )
    parser.add_argument("--in-process", action="store_true", help="with --handler: import it and run it in-process")
    parser.add_argument(
        "--concurrency-modifier", type=int, default=1, help="in-process workers: jobs each worker holds at once"
    )
    parser.add_argument(
        "--full-sleep-ms", type=int, default=1000, help="in-process workers: pause when full (the SDK's 1 s; 0: none)"
    )
    parser.add_argument("--worker-grace-seconds", type=float, default=2.0, help="SIGTERM to SIGKILL on stop")
    parser.add_argument("--long-poll-seconds", type=float, default=5.0, help="job-take / job-stop hold, then 204")
    parser.add_argument("--webhook-retry-delay", type=float, default=10.0, help="seconds between attempts")
    parser.add_argument(
        "--execution-timeout-ms", type=int, default=DEFAULT_EXECUTION_TIMEOUT_MS, help="when policy has none"
    )
    parser.add_argument("--min-execution-timeout-ms", type=int, default=MIN_EXECUTION_TIMEOUT_MS)
    parser.add_argument("--min-ttl-ms", type=int, default=MIN_TTL_MS)
    parser.add_argument("--result-ttl-seconds", type=float, default=RUN_RESULT_TTL_S, help="/run results kept")
    parser.add_argument("--runsync-result-ttl-seconds", type=float, default=RUNSYNC_RESULT_TTL_S)
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="OP=REQUESTS/SECONDS[/CONCURRENT]",
        help="override one of RunPod's limits, e.g. run=1000/10/200 (repeatable)",
    )
    parser.add_argument("--drop-webhooks", type=float, default=0.0, help="probability a webhook is lost")
    parser.add_argument("--duplicate-webhooks", type=float, default=0.0, help="probability one is sent twice")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.workers < 1 or (args.worker_processes is not None and args.worker_processes < 1):
        parser.error("--workers and --worker-processes must be at least 1")
    if args.concurrency_modifier < 1:
        parser.error("--concurrency-modifier must be at least 1")
    if args.worker_processes is not None and (not args.handler or args.in_process):
        parser.error("--worker-processes needs --handler (and not --in-process)")
    if args.in_process and not args.handler:
        parser.error("--in-process needs --handler")
    try:
        args.limits = dict(parse_limit(text) for text in args.limit)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def build(args: argparse.Namespace) -> Emulator:
    config = Config(
        api_key=args.api_key or None,
        webhook_retry_delay=args.webhook_retry_delay,
        execution_timeout_ms=args.execution_timeout_ms,
        result_ttl_seconds=args.result_ttl_seconds,
        runsync_result_ttl_seconds=args.runsync_result_ttl_seconds,
        min_execution_timeout_ms=args.min_execution_timeout_ms,
        min_ttl_ms=args.min_ttl_ms,
        long_poll_seconds=args.long_poll_seconds,
        full_sleep_ms=args.full_sleep_ms,
    )
    faults = Faults()
    faults.update({"drop_webhooks": args.drop_webhooks, "duplicate_webhooks": args.duplicate_webhooks})
    emulator = Emulator(config, faults, Limiter(args.limits))
    if args.handler and not args.in_process:
        count = args.worker_processes or args.workers
        emulator.pool = ProcessPool(
            emulator.board, Path(args.handler), count, args.endpoint_id, emulator.worker_key, args.worker_grace_seconds
        )
    else:
        handler = load_handler(args.handler) if args.handler else sleep_handler(args.sleep_ms or DEFAULT_SLEEP_MS)
        emulator.pool = InProcessPool(emulator.board, config, handler, args.workers, args.concurrency_modifier)
    return emulator


async def serve(args: argparse.Namespace) -> None:
    emulator = build(args)
    runner = web.AppRunner(create_app(emulator), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    # Workers on this machine reach the emulator by loopback even when it listens on every interface.
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    kind = "worker processes" if isinstance(emulator.pool, ProcessPool) else "in-process workers"
    log.info("RunPod emulator on http://%s:%s/v2 with %s", args.host, args.port, kind)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await emulator.start_workers(f"http://{host}:{args.port}")
        await stop.wait()
    finally:
        # Workers first, while the API still answers: the jobs they finish must reach job-done.
        await emulator.stop_workers()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # uvloop: the emulator stands in for RunPod's capacity, so its own overhead per run should be as
    # small as we can make it (benchmark 1 measures against it); and its Process.wait() returns when a
    # worker exits even if the worker's heartbeat child still holds the output pipe (workers.py).
    uvloop.run(serve(args))
