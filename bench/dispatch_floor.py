"""The CPU floor of benchmark 2: the least a dispatcher of Bunch's design does per run.

Bunch's design: runs wait in Redis; a dispatcher keeps C + prefetch of them posted to RunPod with
a webhook URL; RunPod's webhook reaches the gateway, which XADDs it to a stream; the dispatcher
reads the stream, records the outcome and claims the next run atomically in Redis (so replicas
never start a run twice nor go over the cap), POSTs it to /run and records its RunPod id (the
gateway checks webhook bodies against it, the poller asks /status about it when a webhook is lost).

This process does exactly that and nothing else, per run:
  - 1 XREADGROUP of the result stream (count 50, block 1 s), the XACK of what the previous read
    brought riding in the same round trip, as shared/streams.py does: one round trip per read,
    shared by the completions one read brings;
  - json.loads of the result's body (its status decides what is recorded);
  - 1 EVALSHA of CLAIM_LUA per completion, those of one read pipelined in one round trip: it
    records the RunPod ids of the runs started since the last call, marks the finished run done
    (once: a duplicate frees no slot) and pops the next run id off a Redis list, as Bunch's
    COMPLETE_RUN + RECORD_STARTED_AND_CLAIM pipeline (shared/stores/runs.py settle_and_claim) does;
  - 1 POST {runpod}/v2/local/run of the claimed run: a prebuilt input shaped like Bunch's (4 items,
    presigned PUT links built before the clock: not counted) with a webhook URL and a policy,
    serialized per call; its answer parsed for the RunPod id.
So 2 Redis round trips and 1 HTTP call per run at most (fewer when a read brings several
completions), against Bunch's up to four (bench/dispatch.py, B2 note): Bunch also reads the
run's record before verifying a result (ResultHandler._current), builds and checks the images'
records, presigns, gates its RunPod calls, and records a started run's id in a pass of its own
when no completion comes within 5 ms. Those are Bunch's choices; what stays here every dispatcher
of this design needs. No request gate: the bench keeps its workload within RunPod's /run limit
(a 429 ends this process).

The same libraries and settings as Bunch's dispatcher, so that the CPU model cancels out of the
ratio: redis-py's asyncio client (with hiredis) made by shared/redis_connection.connect, aiohttp's
ClientSession, uvloop, the garbage collector settled as the services settle it. Run ids wait in
a Redis db of their own (the bench passes /2), so Bunch's keys are out of reach.

Protocol with the bench: once set up, SET READY_KEY and BLPOP GO_KEY; the bench reads this
process's CPU, resets the emulator and LPUSHes GO_KEY; after the last completion this LPUSHes
DONE_KEY (its counts, JSON) and idles until SIGTERM.

    python -m bench.dispatch_floor --redis redis://127.0.0.1:6379/2 --runpod http://127.0.0.1:8100 \\
        --webhook http://127.0.0.1:8101/webhook --s3 http://127.0.0.1:9000 --runs 1000 --workers 10 --prefetch 10
"""

import argparse
import asyncio
import json
from typing import Any

import aiohttp
import uvloop
from redis.asyncio import Redis

from bench.webhook_sink import STREAM
from services.dispatcher.payloads import policy, run_limits
from shared.lifecycle import settle_garbage_collector
from shared.models import RunInput, WorkItem
from shared.redis_connection import connect
from shared.settings import Settings
from shared.storage import Storage

READY_KEY = "floor:ready"
GO_KEY = "floor:go"
DONE_KEY = "floor:done"
QUEUE_KEY = "floor:queue"  # run ids waiting, in order
RUNS_KEY = "floor:runs"  # run id -> "claimed", its RunPod id once started, or "done"
GROUP = "floor-dispatcher"
CONSUMER = "floor-0"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}

CLAIM_LUA = """
-- KEYS[1] the queue of run ids, KEYS[2] each run's state: "claimed", its RunPod id, or "done"
-- ARGV[1] the finished run ("" for none), ARGV[2] how many runs to claim if it frees its slot,
-- ARGV[3..] run id, RunPod id of each run started since the last call
-- Returns {1 when the finished run was recorded now, {the claimed run ids}}
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[2], ARGV[i]) == 'claimed' then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
local want = tonumber(ARGV[2])
local recorded = 0
if ARGV[1] ~= '' then
  local state = redis.call('HGET', KEYS[2], ARGV[1])
  if not state or state == 'done' then
    want = 0  -- unknown or told twice: it frees no slot
  else
    redis.call('HSET', KEYS[2], ARGV[1], 'done')
    recorded = 1
  end
end
local claimed = {}
if want > 0 then
  claimed = redis.call('LPOP', KEYS[1], want) or {}
  for _, id in ipairs(claimed) do
    redis.call('HSET', KEYS[2], id, 'claimed')
  end
end
return {recorded, claimed}
"""


def run_payload(storage: Storage, n: int, settings: Settings | None = None) -> dict[str, Any]:
    """A run input shaped like Bunch's (4 items with presigned output links, the worker's limits)."""
    settings = settings or Settings()
    items = [
        WorkItem(index=i, prompt="bench", reference_urls=[], output_url=storage.presigned_put(f"bench/{n}/{i}.png"))
        for i in range(4)
    ]
    run = RunInput(
        task="semi_auto_generation",
        job_id="bench",
        run_id=f"bench.{n}",
        attempt=1,
        model="m",
        params={},
        items=items,
        limits=run_limits(settings),
    )
    return run.model_dump(mode="json")


class FloorDispatcher:
    def __init__(self, redis: Redis, session: aiohttp.ClientSession, args: argparse.Namespace) -> None:
        self.redis = redis
        self.session = session
        self.run_url = f"{args.runpod}/v2/local/run"
        self.headers = {"authorization": f"Bearer {args.api_key}", "content-type": "application/json"}
        self.cap = args.workers + args.prefetch
        self.runs = args.runs
        self.bodies: dict[str, dict[str, Any]] = {}
        self.sha = ""
        self.started: list[str] = []  # run id, RunPod id, ...: recorded by the next claim call
        self.starting: set[asyncio.Task[None]] = set()
        self.counts = {"reads": 0, "claim_calls": 0, "posts": 0, "completions": 0}
        self.failure: BaseException | None = None  # a /run that failed: this run cannot finish

    async def prepare(self, webhook: str, s3_url: str) -> None:
        """Everything before the clock: payloads (presigning), the queue, the group, the script."""
        settings = Settings(s3_endpoint=s3_url)
        storage = Storage(settings)
        run_policy = policy(settings)
        for n in range(self.runs):
            run_input = run_payload(storage, n, settings)
            run_id = run_input["run_id"]
            self.bodies[run_id] = {"input": run_input, "webhook": f"{webhook}?run={run_id}", "policy": run_policy}
        await self.redis.rpush(QUEUE_KEY, *self.bodies)
        await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        self.sha = await self.redis.script_load(CLAIM_LUA)

    async def start(self, run_id: str) -> None:
        async with self.session.post(self.run_url, json=self.bodies[run_id], headers=self.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/run answered {resp.status}: {await resp.text()}")
            runpod_id = json.loads(await resp.read())["id"]
        self.started += (run_id, runpod_id)

    def launch(self, run_ids: list[str]) -> None:
        self.counts["posts"] += len(run_ids)
        for run_id in run_ids:
            task = asyncio.create_task(self.start(run_id))
            self.starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        self.starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()

    def claim_args(self, finished: str, want: int) -> list[Any]:
        args: list[Any] = [finished, want, *self.started]
        self.started.clear()
        return args

    async def claim(self, finished: list[str]) -> list[tuple[bool, list[str]]]:
        """One round trip: a CLAIM_LUA per finished run ("" claims the first `cap` runs)."""
        self.counts["claim_calls"] += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for run_id in finished:
                pipe.evalsha(self.sha, 2, QUEUE_KEY, RUNS_KEY, *self.claim_args(run_id, 1 if run_id else self.cap))
            answers = await pipe.execute()
        return [(bool(recorded), list(claimed)) for recorded, claimed in answers]

    async def read(self, handled: list[str]) -> list[tuple[str, dict[str, str]]]:
        """XACK what was handled and read the next results, in one round trip."""
        self.counts["reads"] += 1
        read = {"count": 50, "block": 1000}
        if not handled:
            response = await self.redis.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, **read)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xack(STREAM, GROUP, *handled)
                pipe.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, **read)
                _, response = await pipe.execute()
        return [message for _stream, messages in response or [] for message in messages]

    async def dispatch(self) -> None:
        """From the first claim to the last completion recorded."""
        for _, claimed in await self.claim([""]):
            self.launch(claimed)
        handled: list[str] = []
        while self.counts["completions"] < self.runs:
            if self.failure is not None:
                raise self.failure
            messages = await self.read(handled)
            handled = [message_id for message_id, _ in messages]
            finished = [fields["run_id"] for _, fields in messages if json.loads(fields["body"]).get("status") in FINAL]
            if not finished:
                continue
            for recorded, claimed in await self.claim(finished):
                self.counts["completions"] += recorded
                self.launch(claimed)
        # The last ids and acknowledgements, in one round trip.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(STREAM, GROUP, *handled)
            pipe.evalsha(self.sha, 2, QUEUE_KEY, RUNS_KEY, *self.claim_args("", 0))
            await pipe.execute()


async def main(args: argparse.Namespace) -> None:
    redis = connect(Settings(redis_url=args.redis))
    async with aiohttp.ClientSession() as session:
        floor = FloorDispatcher(redis, session, args)
        await floor.prepare(args.webhook, args.s3)
        settle_garbage_collector()
        await redis.set(READY_KEY, "1")
        await redis.blpop([GO_KEY])
        await floor.dispatch()
        await redis.lpush(DONE_KEY, json.dumps(floor.counts))
        await asyncio.Event().wait()  # until SIGTERM: the bench reads this process's CPU first


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True, help="a db of its own, e.g. redis://127.0.0.1:6379/2")
    parser.add_argument("--runpod", required=True, help="the emulator's base URL (without /v2)")
    parser.add_argument("--api-key", default="emulator-key")
    parser.add_argument("--webhook", required=True, help="bench/webhook_sink.py's URL")
    parser.add_argument("--s3", required=True, help="the S3 endpoint the presigned links name")
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True, help="RunPod concurrency C")
    parser.add_argument("--prefetch", type=int, default=10, help="runs kept queued at RunPod beyond C")
    uvloop.run(main(parser.parse_args()))
