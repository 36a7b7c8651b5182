"""The exporter's settlements on a real Redis: counted a batch per call, once each, and a run that
learns of a cancel or of an unreachable Redis from them."""

import asyncio

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.packager.exports import settler as settler_module
from services.packager.exports.settler import Settler
from shared.stores.exports import ExportStatus, ExportStore, Outcome, Settlement
from tests.test_export_store import new_export


async def started_export(store: ExportStore, total: int) -> str:
    export_id = await new_export(store)
    await store.start(export_id, total)
    return export_id


async def script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_settlements_are_counted_a_batch_per_call_and_once_each(fresh_redis: Redis) -> None:
    store = ExportStore(fresh_redis)
    export_id = await started_export(store, 600)
    settler = Settler(store, export_id)
    before = await script_calls(fresh_redis)
    for index in range(600):
        settler.add(Settlement(f"j:{index}", Outcome.COPIED, 10))
        if index % 50 == 0:
            await asyncio.sleep(0)  # copies finish between settlements: the loop runs meanwhile
    settler.add(Settlement("j:0", Outcome.SKIPPED))  # the same object again: not counted twice
    await settler.close()
    calls = await script_calls(fresh_redis) - before
    # 601 settlements in batches of up to 256 (a partial one may go while more arrive): a handful
    # of calls, not one per object (each call costs the loop ~0.3 ms of CPU).
    assert calls <= 5, calls
    assert settler.outcomes == {Outcome.COPIED: 600, Outcome.SKIPPED: 0, Outcome.FAILED: 0}
    record = await store.find(export_id)
    assert record is not None and (record.objects_copied, record.objects_skipped, record.bytes_copied) == (600, 0, 6000)


async def test_a_settlement_waits_at_most_the_linger(fresh_redis: Redis) -> None:
    store = ExportStore(fresh_redis)
    export_id = await started_export(store, 1)
    settler = Settler(store, export_id)
    settler.add(Settlement("j:0", Outcome.COPIED, 5))
    await asyncio.sleep(settler_module.LINGER_SECONDS * 3)
    record = await store.find(export_id)
    assert record is not None and record.objects_copied == 1  # counted without close(): progress moves
    await settler.close()


async def test_a_cancel_seen_in_a_reply_ends_the_run(fresh_redis: Redis) -> None:
    store = ExportStore(fresh_redis)
    export_id = await started_export(store, 2)
    settler = Settler(store, export_id)
    settler.add(Settlement("j:0", Outcome.COPIED, 5))
    await settler.close()
    assert not settler.ended
    await store.cancel("p", export_id)
    late = Settler(store, export_id)
    late.add(Settlement("j:1", Outcome.COPIED, 5))
    await late.close()
    assert late.ended and late.outcomes[Outcome.COPIED] == 0
    record = await store.find(export_id)
    assert record is not None and record.status == ExportStatus.CANCELED and record.objects_copied == 1


async def test_a_batch_redis_refuses_stops_the_run_with_the_error(redis_url: str) -> None:
    redis = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9", decode_responses=True)
    store = ExportStore(redis)
    export_id = await started_export(store, 1)
    settler = Settler(store, export_id)
    await redis.aclose()
    settler.exports = ExportStore(Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))  # nothing listens
    settler.add(Settlement("j:0", Outcome.COPIED, 5))
    await asyncio.sleep(settler_module.LINGER_SECONDS * 2)
    assert settler.failure is not None  # the run sees it and stops taking objects
    with pytest.raises(redis_errors.ConnectionError):
        await settler.close()
