"""Runs in Redis: claiming them to start, recording RunPod's ids, storing outcomes, retries and the
in-flight index the poller watches. What the dispatcher changes on every pass.

With `redis_wait_replicas` set, each claim and outcome is followed (same round trip) by Redis WAIT,
so the dispatcher starts a run on RunPod only once a replica holds its claim: a failover then loses
a claim only when no replica confirmed it in time. When none does (every replica lost), waiting
stops for REPLICA_RETRY_SECONDS, so a primary left alone costs one timeout per that period, not
one per pass; such writes are counted (metrics.UNREPLICATED_WRITES). Correctness never depends on
WAIT: a lost claim is made again under a new name (shared/lua/record_started_and_claim.lua).
"""

import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shared import keys, metrics, planning, pricing, scripts
from shared.planning import JobConfig
from shared.scripts import Reply, Script
from shared.settings import Settings
from shared.stores.records import ClaimedRun, Claims, Completion, RunRecord, StartedRun, present

log = logging.getLogger(__name__)


REPLICA_RETRY_SECONDS = 5.0


class RunStore:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._wait_again_at = 0.0  # monotonic time; WAIT is skipped before it (no replica answered)

    def _wait(self) -> tuple[int, int] | None:
        """The WAIT to send after a claim or outcome now: (replicas, timeout ms), or None."""
        replicas = self.settings.redis_wait_replicas
        if not replicas or time.monotonic() < self._wait_again_at:
            return None
        return replicas, self.settings.redis_wait_timeout_ms

    def _waited(self, confirmed: int | None) -> None:
        if confirmed is None or confirmed >= self.settings.redis_wait_replicas:
            return
        metrics.UNREPLICATED_WRITES.inc()
        log.warning(
            "%d of %d replicas confirmed a claim or outcome within %d ms; not waiting for them for %.0f s",
            confirmed,
            self.settings.redis_wait_replicas,
            self.settings.redis_wait_timeout_ms,
            REPLICA_RETRY_SECONDS,
        )
        self._wait_again_at = time.monotonic() + REPLICA_RETRY_SECONDS

    async def acquire_many(self, now: float, deadline: float, limit: int, started: Sequence[StartedRun] = ()) -> Claims:
        """Record the RunPod ids of `started`, then claim up to `limit` runs, in the order single
        claims would take them (fewer than `limit`: no more can start now). Atomic across replicas."""
        args = self._claim_args(now, deadline, limit, started)
        ((claimed,), confirmed) = await evalsha_all(
            self.redis, [(scripts.RECORD_STARTED_AND_CLAIM, [], args)], self._wait()
        )
        self._waited(confirmed)
        if isinstance(claimed, Exception):
            raise claimed
        return _claims(claimed)

    async def settle_and_claim(
        self, completions: Sequence[Completion], now: float, deadline: float, limit: int, started: Sequence[StartedRun]
    ) -> tuple[list[bool | Exception], Claims | Exception]:
        """A dispatcher pass in one round trip: COMPLETE_RUN each finished run (True: recorded now,
        not before), then acquire_many. Each part succeeds or fails on its own."""
        costs = [self._cost(completion) for completion in completions]
        calls = [
            (scripts.COMPLETE_RUN, completion.keys(), completion.args(now, cost))
            for completion, cost in zip(completions, costs, strict=True)
        ]
        calls.append((scripts.RECORD_STARTED_AND_CLAIM, [], self._claim_args(now, deadline, limit, started)))
        (*completed, claimed), confirmed = await evalsha_all(self.redis, calls, self._wait())
        self._waited(confirmed)
        outcomes = [
            answer if isinstance(answer, Exception) else _recorded(answer, cost)
            for answer, cost in zip(completed, costs, strict=True)
        ]
        return outcomes, claimed if isinstance(claimed, Exception) else _claims(claimed)

    def _cost(self, completion: Completion) -> pricing.RunCost:
        prompt_tokens, output_tokens = completion.tokens()
        return pricing.run_cost(self.settings, completion.lane, prompt_tokens, output_tokens, completion.runpod_ms)

    def _claim_args(self, now: float, deadline: float, limit: int, started: Sequence[StartedRun]) -> list[Any]:
        s = self.settings
        cap = s.max_concurrency + s.dispatch_prefetch
        args: list[Any] = [cap, now, deadline, s.project_max_concurrency, s.dispatch_rpm, limit]
        args.append(secrets.token_hex(5))  # with each claim's order: the claim's name
        for run in started:
            args += [run.run_id, run.attempt, run.claim, run.runpod_id]
        return args

    async def requeue(
        self, run_id: str, attempt: int, claim: str, ready_at: float, *, new_attempt: bool, reason: str
    ) -> int:
        """Schedule a run again; returns the attempt it will run as (0 if that claim was not live)."""
        args = [run_id, attempt, ready_at, int(new_attempt), reason, claim]
        requeued = await scripts.REQUEUE_RUN(self.redis, [keys.run(run_id)], args)
        return int(requeued.values[0]) if requeued.done else 0

    async def complete(self, completion: Completion) -> bool:
        """Store a run's final outcome once; the last run of a job moves it to packaging."""
        cost = self._cost(completion)
        call = (scripts.COMPLETE_RUN, completion.keys(), completion.args(time.time(), cost))
        ((stored,), confirmed) = await evalsha_all(self.redis, [call], self._wait())
        self._waited(confirmed)
        if isinstance(stored, Exception):
            raise stored
        return _recorded(stored, cost)

    async def run(self, run_id: str) -> RunRecord | None:
        raw = await self.redis.hgetall(keys.run(run_id))
        return RunRecord.model_validate(present(raw)) if raw else None

    async def run_slots(self, run_id: str, config: JobConfig) -> Sequence[int]:
        """The image indices a run produces: planned runs by their index, redo runs as recorded."""
        _, name = keys.split_run_id(run_id)
        if name.isdigit():
            return planning.run_slots(config, int(name), self.settings.run_size_for(config.lane))
        slots = await self.redis.hget(keys.run(run_id), "slots")
        return [int(i) for i in (slots or "").split(",") if i]

    async def overdue_runs(self, now: float, limit: int = 100) -> list[str]:
        return list(await self.redis.zrangebyscore(keys.RUNNING, "-inf", now, start=0, num=limit))

    async def release_slots(self, run_id: str, project: str) -> None:
        """Drop a settled run's stray in-flight entries, freeing the slots it held."""
        await scripts.RELEASE_RUN_SLOTS(self.redis, [], [run_id, project])

    async def count_status_refusal(self, run_id: str) -> int:
        """One more /status refusal for the run's current attempt (requeue_run clears the count)."""
        return int(await self.redis.hincrby(keys.run(run_id), "status_refusals", 1))

    async def postpone(self, run_id: str, deadline: float) -> None:
        await self.redis.zadd(keys.RUNNING, {run_id: deadline}, xx=True)


def _recorded(stored: Reply, cost: pricing.RunCost) -> bool:
    """Whether COMPLETE_RUN stored the outcome now; its cost is counted (once) when it did."""
    if not stored.done:
        return False
    metrics.count_cost(cost)
    paused = stored.values[0] if stored.values else ""
    if paused:
        metrics.BUDGET_PAUSES.inc()
        log.warning("project %s reached its budget: paused until its period ends or an operator resumes it", paused)
    return True


def _claims(claimed: Reply) -> Claims:
    runs, recorded = claimed.values
    triples = [ClaimedRun(str(runs[i]), int(runs[i + 1]), str(runs[i + 2])) for i in range(0, len(runs), 3)]
    return Claims(triples, [bool(flag) for flag in recorded])


async def evalsha_all(
    redis: Redis, calls: Sequence[tuple[Script, list[str], list[Any]]], wait: tuple[int, int] | None = None
) -> tuple[list[Reply | Exception], int | None]:
    """Run scripts in one pipeline by SHA; each answer is that call's Reply, or its error. With
    `wait` (replicas, timeout ms), a WAIT follows them in the same round trip; the second value is
    the replicas that confirmed (None: no WAIT was sent).

    redis-py's own pipelined scripts cost a SCRIPT EXISTS round trip on every execute. Here a
    script Redis no longer knows (it restarted, or failed over) is loaded and only the calls it
    refused run again.
    """
    answers: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    confirmed: int | None = None
    for _ in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                script, script_keys, args = calls[i]
                pipe.evalsha(script.sha, len(script_keys), *script_keys, *args)
            if wait is not None:
                pipe.execute_command("WAIT", *wait)
            results = await pipe.execute(raise_on_error=False)
        if wait is not None:
            waited = results.pop()
            if isinstance(waited, Exception):
                raise waited
            confirmed = int(waited)
        for i, result in zip(todo, results, strict=True):
            answers[i] = result
        todo = [i for i in todo if isinstance(answers[i], NoScriptError)]
        if not todo:
            break
        for script in {calls[i][0] for i in todo}:
            await redis.script_load(script.text)
    return [answer if isinstance(answer, Exception) else scripts.reply(answer) for answer in answers], confirmed
