"""The webhook receiver of the dispatcher CPU floor (bench/dispatch_floor.py): the gateway's part.

It takes what the RunPod emulator POSTs when a run ends (the /status body plus `input` and
`webhook`, deploy/emulators/runpod/webhooks.py; anything but a 200 is retried) and XADDs it to
STREAM as the gateway hands a webhook on to Bunch's dispatcher (shared/task_results.py: the same
fields, the body cut to what a dispatcher reads). It runs in a process of its own, as the gateway
does, so its CPU is not the floor dispatcher's. No token check: that is the gateway's cost, not the
dispatcher's.

    python -m bench.webhook_sink --redis redis://127.0.0.1:6379/2 --port 8101
"""

import argparse
import asyncio
import json

import uvloop
from aiohttp import web

from shared.redis_connection import connect
from shared.settings import Settings
from shared.task_results import task_result

STREAM = "floor:task-results"


async def serve(redis_url: str, port: int) -> None:
    redis = connect(Settings(redis_url=redis_url))

    async def receive(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        await redis.xadd(STREAM, task_result(request.query["run"], 1, "", body, "webhook"))
        return web.json_response({"accepted": True})

    app = web.Application()
    app.router.add_post("/webhook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM ends the process


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.redis, args.port))
