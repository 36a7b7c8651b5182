"""The consumer-group loop every service runs, against a real redis-server."""

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from shared import keys, metrics
from shared.dead_letters import redrive
from shared.streams import Fields, StreamConsumer

STREAM = keys.CONTROL_STREAM
GROUP = "test-group"


@pytest.fixture
async def private_redis(redis_url: str) -> AsyncIterator[tuple[Redis, str]]:
    # A database of its own: the dead-letter stream's name is global.
    url = redis_url.rsplit("/", 1)[0] + "/7"
    client = Redis.from_url(url, decode_responses=True)
    await client.flushdb()
    yield client, url
    await client.flushdb()
    await client.aclose()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def running(consumer: StreamConsumer) -> tuple[asyncio.Event, "asyncio.Task[None]"]:
    stop = asyncio.Event()
    return stop, asyncio.create_task(consumer.run(stop))


async def dead_letters_gauge(redis: Redis) -> float:
    families = text_string_to_metric_families((await metrics.render(redis)).decode())
    return next(s.value for f in families for s in f.samples if s.name == "bunch_dead_letters")


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "shared.dead_letters", *args], env=env, capture_output=True, text=True, check=True
    )


async def test_a_message_held_by_a_dead_consumer_is_taken_over(private_redis: tuple[Redis, str]) -> None:
    redis, _ = private_redis
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {"n": "1"})
    await redis.xreadgroup(GROUP, "died-holding-it", {STREAM: ">"})  # read, never acknowledged
    handled: list[Fields] = []

    async def handle(fields: Fields) -> None:
        handled.append(fields)

    stop, task = await running(StreamConsumer(redis, STREAM, GROUP, "live", handle, claim_idle_ms=200, block_ms=50))
    await eventually(lambda: _pending_count(redis, 0))
    stop.set()
    await task
    assert handled == [{"n": "1"}]


async def test_a_poison_message_is_dead_lettered_then_redriven_once_fixed(private_redis: tuple[Redis, str]) -> None:
    redis, url = private_redis
    handled: list[Fields] = []
    broken = True

    async def handle(fields: Fields) -> None:
        if broken:
            raise RuntimeError("a dependency is down")
        handled.append(fields)

    consumer = StreamConsumer(redis, STREAM, GROUP, "live", handle, claim_idle_ms=100, block_ms=50, max_deliveries=2)
    stop, task = await running(consumer)
    await redis.xadd(STREAM, {"job_id": "j1", "run_ids": "a,b"})
    await eventually(lambda: _dead_letters(redis, 1))
    await eventually(lambda: _pending_count(redis, 0))  # given up on: no longer delivered
    assert handled == []

    assert await dead_letters_gauge(redis) == 1
    listed = [json.loads(line) for line in cli(url, "list").stdout.splitlines()]
    assert [(d["stream"], d["fields"]) for d in listed] == [(STREAM, {"job_id": "j1", "run_ids": "a,b"})]

    broken = False
    done = cli(url, "redrive", listed[0]["id"])
    assert "re-drove 1 dead letters" in done.stderr
    await eventually(lambda: _handled(handled, 1))
    assert handled == [{"job_id": "j1", "run_ids": "a,b"}]
    assert await redis.xlen(keys.DEAD_LETTERS_STREAM) == 0
    assert await dead_letters_gauge(redis) == 0
    stop.set()
    await task


async def test_redrive_refuses_a_letter_for_a_stream_nobody_reads(private_redis: tuple[Redis, str]) -> None:
    redis, _ = private_redis
    await redis.xadd(keys.DEAD_LETTERS_STREAM, {"stream": "elsewhere", "x": "1"})
    with pytest.raises(ValueError, match="not a stream Bunch consumes"):
        await redrive(redis)
    assert await redis.xlen(keys.DEAD_LETTERS_STREAM) == 1
    assert not await redis.exists("elsewhere")


async def test_departed_consumers_are_forgotten_but_not_with_their_messages(private_redis: tuple[Redis, str]) -> None:
    redis, _ = private_redis
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    await redis.xadd(STREAM, {"n": "1"})
    await redis.xadd(STREAM, {"n": "2"})
    [[_, [(first, _)]]] = await redis.xreadgroup(GROUP, "scaled-away", {STREAM: ">"}, count=1)
    await redis.xack(STREAM, GROUP, first)
    await redis.xreadgroup(GROUP, "died-holding-one", {STREAM: ">"}, count=1)
    await asyncio.sleep(0.3)

    async def handle(fields: Fields) -> None:
        pass

    # claim_idle_ms long: the held message stays with its consumer, which must then be kept.
    consumer = StreamConsumer(redis, STREAM, GROUP, "live", handle, claim_idle_ms=60_000, forget_idle_ms=200)
    stop, task = await running(consumer)
    await eventually(lambda: _consumers(redis, {"died-holding-one", "live"}))
    stop.set()
    await task
    await asyncio.sleep(0.3)
    await consumer._forget_departed()  # idle long enough itself now, yet its own name is kept
    assert await _consumers(redis, {"died-holding-one", "live"})


async def _pending_count(redis: Redis, expected: int) -> bool:
    return int((await redis.xpending(STREAM, GROUP))["pending"]) == expected


async def _dead_letters(redis: Redis, expected: int) -> bool:
    return int(await redis.xlen(keys.DEAD_LETTERS_STREAM)) == expected


async def _handled(handled: list[Fields], expected: int) -> bool:
    return len(handled) == expected


async def _consumers(redis: Redis, expected: set[str]) -> bool:
    return {c["name"] for c in await redis.xinfo_consumers(STREAM, GROUP)} == expected


async def test_trimming_keeps_every_entry_not_yet_read_or_acknowledged(private_redis: tuple[Redis, str]) -> None:
    redis, _ = private_redis
    await redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    ids = [await redis.xadd(STREAM, {"n": str(n)}) for n in range(1000)]
    # A consumer that died holding entries 300-309, after the group was handed 0-599 and acked the rest.
    await redis.xreadgroup(GROUP, "finished", {STREAM: ">"}, count=300)
    await redis.xack(STREAM, GROUP, *ids[:300])
    await redis.xreadgroup(GROUP, "died-holding-some", {STREAM: ">"}, count=10)
    await redis.xreadgroup(GROUP, "finished", {STREAM: ">"}, count=290)
    await redis.xack(STREAM, GROUP, *ids[310:600])
    handled: list[Fields] = []

    async def handle(fields: Fields) -> None:
        handled.append(fields)

    # The live consumer trims as it starts (and every claim period); a long claim time keeps the
    # dead consumer's entries pending while the trim runs.
    consumer = StreamConsumer(redis, STREAM, GROUP, "live", handle, claim_idle_ms=60_000, block_ms=50)
    stop, task = await running(consumer)
    await eventually(lambda: _handled_count(handled, 400))
    stop.set()
    await task
    assert [int(f["n"]) for f in handled] == list(range(600, 1000))  # nothing unread was lost
    remaining = [entry_id for entry_id, _ in await redis.xrange(STREAM)]
    assert set(ids[300:310]) <= set(remaining)  # the dead consumer's entries wait to be claimed
    assert len(remaining) < 1000 - 250  # most of what was acknowledged before them is gone
    assert ids[0] not in remaining
    pending = await redis.xpending(STREAM, GROUP)
    assert pending["pending"] >= 10 and pending["min"] == ids[300]
    # Once they are acknowledged too, everything up to the last handed out can go.
    await redis.xack(STREAM, GROUP, *ids[300:310], *ids[600:])
    await consumer.trim_acknowledged()
    assert len(await redis.xrange(STREAM)) < 200


async def _handled_count(handled: list[Fields], count: int) -> bool:
    return len(handled) >= count
