"""Baseline (a) of the dispatch benchmark: a plain arq worker in front of the RunPod emulator.

What a user would write instead of Bunch: one arq job per run, `max_jobs = C`, the job POSTs /run
and polls /status until the run is final (no webhooks), then bumps a counter the benchmark reads.

    python -m bench.arq_worker --redis redis://127.0.0.1:6379/1 --runpod http://127.0.0.1:8100 --max-jobs 50
"""

import argparse
import asyncio
import logging
from typing import Any

import aiohttp
from arq.connections import RedisSettings
from arq.worker import Worker, func

from services.dispatcher.runpod_client import RunPodClient

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
DONE_KEY = "bench:arq:done"
FUNCTION = "run_once"


async def run_once(ctx: dict[str, Any], run_input: dict[str, Any]) -> str:
    client: RunPodClient = ctx["runpod"]
    runpod_id = await client.run(run_input)
    status = "IN_QUEUE"
    while status not in FINAL:
        await asyncio.sleep(ctx["poll_seconds"])
        body = await client.status(runpod_id)
        status = "EXPIRED" if body is None else str(body.get("status"))
        if body is None:
            break
    await ctx["redis"].incr(DONE_KEY)
    return status


async def main(args: argparse.Namespace) -> None:
    async with aiohttp.ClientSession() as session:

        async def startup(ctx: dict[str, Any]) -> None:
            ctx["runpod"] = RunPodClient(session, f"{args.runpod}/v2", "local", args.api_key)
            ctx["poll_seconds"] = args.poll_ms / 1000

        worker = Worker(
            functions=[func(run_once, name=FUNCTION)],
            redis_settings=RedisSettings.from_dsn(args.redis),
            max_jobs=args.max_jobs,
            on_startup=startup,
            handle_signals=False,  # SIGTERM from the benchmark simply ends the process
            job_timeout=600,
            poll_delay=args.poll_delay,
        )
        await worker.main()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--runpod", required=True, help="the emulator's base URL (without /v2)")
    parser.add_argument("--api-key", default="emulator-key")
    parser.add_argument("--max-jobs", type=int, default=50)
    parser.add_argument("--poll-ms", type=int, default=50, help="interval between /status calls of one run")
    parser.add_argument("--poll-delay", type=float, default=0.5, help="arq's queue poll interval (its default 0.5)")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(parser.parse_args()))
