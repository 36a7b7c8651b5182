"""The Lua scripts as files: each documented, each loaded, each compiled by a real redis-server, and
the state machines they check are the ones shared/models.py writes down."""

import json
import re

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared import keys, scripts
from shared.models import JOB_TRANSITIONS, RUN_TRANSITIONS, JobStatus, SemiAutoJobRequest
from shared.settings import Settings
from shared.stores.jobs import JobStore

LOADED = {value.name: value for value in vars(scripts).values() if isinstance(value, scripts.Script)}


def test_every_script_file_is_loaded_and_opens_with_its_contract() -> None:
    files = {path.stem for path in scripts.LUA_DIR.glob("*.lua")}
    assert files == set(LOADED), "a script file no code loads, or a script without its file"
    for name in files:
        header = (scripts.LUA_DIR / f"{name}.lua").read_text().split("\n\n", 1)[0]
        for part in ("-- KEYS:", "-- ARGV:", "-- Returns:"):
            assert part in header, f"{name}.lua: no {part!r} in its opening comment"
        for include in re.findall(r'^--- @include "(\w+)"$', header, re.M):
            assert (scripts.LUA_DIR / "include" / f"{include}.lua").exists(), f"{name}.lua: {include}"


async def test_every_script_compiles_in_redis(fresh_redis: Redis) -> None:
    for script in [*LOADED.values(), scripts.queue_figures(["id", "status"])]:
        assert await fresh_redis.script_load(script.text) == script.sha, script.name


async def test_the_lua_state_machines_are_the_models_ones(fresh_redis: Redis) -> None:
    for table, machine in (("JOB_NEXT", JOB_TRANSITIONS), ("RUN_NEXT", RUN_TRANSITIONS)):
        as_json = await fresh_redis.eval(
            scripts.PRELUDE
            + f"local out = {{}} for state, next in pairs({table}) do local list = {{}} "
            + "for s in pairs(next) do list[#list + 1] = s end table.sort(list) out[state] = list end "
            + "return cjson.encode(out)",
            0,
        )
        assert {state: set(following) for state, following in json.loads(as_json).items()} == {
            state.value: {s.value for s in following} for state, following in machine.items()
        }


async def test_a_status_change_the_machine_does_not_allow_is_refused(fresh_redis: Redis, settings: Settings) -> None:
    store = JobStore(fresh_redis, settings)
    job = await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4))
    with pytest.raises(ResponseError, match="no job transition from queued to completed"):
        await store.transition(job.id, JobStatus.QUEUED, JobStatus.COMPLETED)
    assert await fresh_redis.hget(keys.job(job.id), "status") == "queued"  # nothing written
    assert not await store.transition(job.id, JobStatus.PROCESSING, JobStatus.PACKAGING)  # not in `from`
    # set_status itself guards every script: a write that skipped a state stops there.
    await fresh_redis.hset(keys.job(job.id), "status", "canceled")
    helpers = (scripts.LUA_DIR / "include" / "job_status.lua").read_text()
    with pytest.raises(ResponseError, match="no transition from canceled to processing"):
        await fresh_redis.eval(scripts.PRELUDE + helpers + f"\nset_status('{job.id}', 'processing', 1)", 0)
    assert await fresh_redis.hget(keys.job(job.id), "status") == "canceled"


async def test_a_script_redis_forgot_is_loaded_again(fresh_redis: Redis, settings: Settings) -> None:
    store = JobStore(fresh_redis, settings)
    job = await store.create("p", SemiAutoJobRequest(mode="semi_auto", prompts=["p"], images_per_prompt=4))
    await fresh_redis.script_flush()  # as after a restart or a failover to a replica without them
    assert await store.set_priority(job.id, 3)
    assert await fresh_redis.hget(keys.job(job.id), "priority") == "3"
