"""The export records' scripts on a real Redis: each object counted once, however often it is settled;
the end of an export said once, on the event stream and to the notifier; a project's cap."""

import pytest
from redis.asyncio import Redis

from shared import keys
from shared.errors import Conflict, OverQuota
from shared.scripts import Answer
from shared.stores.exports import ExportLayout, ExportStatus, ExportStore, ObjectError, Outcome, Settlement


async def new_export(store: ExportStore, project: str = "p", webhook_url: str | None = None) -> str:
    record = await store.create(
        project,
        "archive",
        job_ids=[],
        group_ids=["a" * 32],
        layout=ExportLayout.BY_GROUP,
        include_manifest=True,
        webhook_url=webhook_url,
    )
    return record.id


async def test_an_object_settled_twice_is_counted_once(fresh_redis: Redis) -> None:
    store = ExportStore(fresh_redis, max_errors_kept=1)
    export_id = await new_export(store)
    assert (await store.start(export_id, 3)).values == (1,)
    assert (await store.start(export_id, 3)).values == (2,)  # taken up again after a crash
    assert (await store.settle(export_id, [Settlement("j:0", Outcome.COPIED, 100)])).values == ("running", 1)
    # The resumed export finds it there, in a batch with two failures: only those are counted.
    failures = [
        Settlement(
            f"j:{index}", Outcome.FAILED, 0, ObjectError(object=f"k/{index}", job_id="j", index=index, reason="nope")
        )
        for index in (1, 2)
    ]
    again = await store.settle(export_id, [failures[0], Settlement("j:0", Outcome.SKIPPED), failures[1]])
    assert again.answer == Answer.DONE and again.values == ("running", 1, 0, 1)
    record = await store.find(export_id)
    assert record is not None and record.status == ExportStatus.RUNNING and record.attempts == 2
    assert record.progress() == {
        "objects_total": 3,
        "objects_done": 3,
        "objects_copied": 1,
        "objects_skipped": 0,
        "objects_failed": 2,
        "bytes_copied": 100,
    }
    assert [e.object for e in await store.errors(export_id, 10)] == ["k/1"]  # one kept, both counted
    assert await store.settled(export_id, ["j:0", "j:1", "j:3"]) == {"j:0", "j:1"}


async def test_the_end_is_told_once_and_frees_the_projects_place(fresh_redis: Redis) -> None:
    store = ExportStore(fresh_redis, max_active=2)
    first = await new_export(store, webhook_url="https://hooks.example.com/bunch")
    second = await new_export(store)
    with pytest.raises(OverQuota, match="2 exports queued or running"):
        await new_export(store)
    assert await new_export(store, project="other")  # another project's place is its own

    await store.start(first, 1)
    await store.settle(first, [Settlement("j:0", Outcome.COPIED, 10)])
    assert (await store.finish(first, ExportStatus.COMPLETED, objects_total=1)).done
    assert (await store.finish(first, ExportStatus.FAILED)).values == ("completed",)
    late = await store.settle(first, [Settlement("j:1", Outcome.COPIED, 10)])
    assert late.answer == Answer.REFUSED and late.values == ("completed",)  # not counted
    assert not await fresh_redis.exists(keys.export_done(first))
    assert await new_export(store)  # its place is free again

    events = [fields for _, fields in await fresh_redis.xrange(keys.EVENTS_STREAM)]
    assert [(e["export_id"], e["status"]) for e in events] == [(first, "running"), (first, "completed")]
    assert events[-1]["objects_copied"] == "1" and events[-1]["project"] == "p"
    notices = [fields for _, fields in await fresh_redis.xrange(keys.NOTIFICATIONS_STREAM)]
    assert notices == [{"export_id": first}]  # the second has no webhook_url

    canceled = await store.cancel("p", second)
    assert canceled.status == ExportStatus.CANCELED and canceled.completed_at is not None
    with pytest.raises(Conflict, match="ended already"):
        await store.cancel("p", second)
    assert [r.id for r in await store.newest("p", 10)][-2:] == [second, first]
