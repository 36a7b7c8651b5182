"""The dispatcher process: `python -m services.dispatcher`."""

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import uvloop

from services.dispatcher.batch_lane.gemini import GeminiBatches, client_for
from services.dispatcher.batch_lane.lane import BatchLane
from services.dispatcher.budgets import BudgetResumer
from services.dispatcher.configs import ConfigCache
from services.dispatcher.dispatch import Dispatcher
from services.dispatcher.health import HealthReader
from services.dispatcher.poller import Poller
from services.dispatcher.results import ResultHandler
from services.dispatcher.runpod_client import RunPodClient
from services.dispatcher.wakeups import JobWakeups
from shared import keys, metrics
from shared.lifecycle import run_service, run_until_signalled, settle_garbage_collector
from shared.redis_connection import connect, wait_until_usable
from shared.secret_policy import refuse_unsafe_secrets
from shared.settings import Settings
from shared.storage import Storage
from shared.stores.batches import BatchStore
from shared.stores.budgets import BudgetStore
from shared.stores.jobs import JobStore
from shared.stores.runs import RunStore
from shared.stores.upstream import UpstreamStore
from shared.streams import StreamConsumer, consumer_name

log = logging.getLogger("dispatcher")


async def main(settings: Settings) -> None:
    refuse_unsafe_secrets(settings)
    redis = connect(settings)
    # Up before Redis is: the probes must answer while the service waits for it.
    exporter = await metrics.serve(redis, settings.metrics_port) if settings.metrics_port else None
    await wait_until_usable(redis)
    store = JobStore(redis, settings)
    runs = RunStore(redis, settings)
    await store.set_weights(settings.weight_by_project())
    budgets = BudgetStore(redis)
    # complete_run.lua compares each project's spend with the budget kept here.
    await budgets.set_limits(settings.budget_by_project())
    storage = Storage(settings)
    wakeup = asyncio.Event()
    name = consumer_name(settings, "dispatcher")
    async with aiohttp.ClientSession() as session:
        runpod = RunPodClient(
            session,
            settings.runpod_base_url,
            settings.runpod_endpoint_id,
            settings.runpod_api_key.get_secret_value(),
            attempts=settings.runpod_request_attempts,
            limit_share=settings.runpod_limit_share,
        )
        configs = ConfigCache(store)
        upstream = UpstreamStore(redis)
        dispatcher = Dispatcher(runs, configs, storage, runpod, settings, wakeup, upstream)
        results = ResultHandler(runs, configs, settings, dispatcher.complete, storage, upstream)
        batch_store = BatchStore(redis, settings)
        batch_lane = None
        if settings.gemini_api_key.get_secret_value():
            gemini = GeminiBatches(client_for(settings), settings.gemini_model)
            batch_lane = BatchLane(batch_store, runs, configs, gemini, storage, settings)
        else:
            log.warning("the batch lane is off: no BUNCH_GEMINI_API_KEY; the gateway refuses batch-lane jobs")
        await batch_store.announce(batch_lane is not None)

        async def handle_control(fields: dict[str, str]) -> None:
            if fields.get("action") != "cancel_batches":
                await dispatcher.handle_control(fields)
            elif batch_lane is not None:
                await batch_lane.cancel_batches(json.loads(fields.get("names") or "[]"))

        async def record_result(fields: dict[str, str]) -> None:
            await results(fields)
            wakeup.set()

        idle = settings.stream_claim_idle_ms
        # Concurrent: each result waits on object storage (services/dispatcher/verify.py), and
        # results of different runs do not depend on each other.
        outcomes = StreamConsumer(
            redis,
            keys.TASK_RESULTS_STREAM,
            keys.DISPATCHER_GROUP,
            name,
            record_result,
            claim_idle_ms=idle,
            concurrency=settings.result_verify_concurrency,
        )
        # With a heartbeat: a bulk cancel waits on RunPod's /cancel limit and may take minutes.
        control = StreamConsumer(
            redis,
            keys.CONTROL_STREAM,
            keys.DISPATCHER_GROUP,
            name,
            handle_control,
            claim_idle_ms=idle,
            heartbeat=True,
        )
        poller = Poller(runs, redis, runpod, settings)
        health = HealthReader(runpod, upstream, settings.runpod_health_interval_seconds)
        # No stream for new jobs: create.lua queues each one itself and only announces it on Pub/Sub.
        wakeups = JobWakeups(redis, wakeup)
        settle_garbage_collector()
        tasks: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = [
            wakeups.run,
            outcomes.run,
            control.run,
            dispatcher.run,
            poller.run,
            health.run,
            BudgetResumer(budgets).run,
        ]
        if batch_lane is not None:
            tasks.append(batch_lane.run)
        await run_until_signalled(tasks)
        if exporter is not None:
            await exporter.cleanup()
    await redis.aclose()


if __name__ == "__main__":
    run_service("dispatcher", main, uvloop.run)
