"""Every script answers in one shape, `{ANSWER, values...}`, read in one place (shared.scripts.reply)."""

import re

import pytest
from redis.asyncio import Redis

from shared import keys, scripts
from shared.scripts import Answer, Reply, reply
from shared.settings import Settings
from shared.stores.runs import RunStore, evalsha_all


def test_every_script_says_it_returns_a_table_opening_with_an_answer() -> None:
    names = "|".join(answer.name for answer in Answer)
    for path in scripts.LUA_DIR.glob("*.lua"):
        header = path.read_text().split("\n\n", 1)[0]
        (returns,) = re.findall(r"^-- Returns: (.*)$", header, re.M)
        assert re.match(rf"\{{({names})\b", returns), f"{path.name}: {returns}"


def test_a_reply_is_its_answer_and_what_follows_it() -> None:
    assert reply([1]) == Reply(Answer.DONE, ())
    assert reply([0, "processing"]) == Reply(Answer.REFUSED, ("processing",))
    assert reply([4, [2, 5]]).values == ([2, 5],)
    assert reply([1]).done and not reply([5]).done
    not_replies: list[object] = [1, None, [], "DONE"]
    for raw in not_replies:
        with pytest.raises(TypeError):
            reply(raw)
    with pytest.raises(ValueError):
        reply([99])


async def test_scripts_called_alone_or_pipelined_answer_alike(fresh_redis: Redis, settings: Settings) -> None:
    project_keys = [keys.project_paused("p")]
    alone = await scripts.SET_PAUSED(fresh_redis, project_keys, ["p", 1])
    await fresh_redis.script_flush()  # the pipelined helper loads what Redis forgot
    stale = (scripts.TRANSITION_JOB, [keys.job("j")], ["j", "queued", "processing", 1])
    calls = [(scripts.SET_PAUSED, project_keys, ["p", 0]), stale]
    (resumed, refused), confirmed = await evalsha_all(fresh_redis, calls)
    assert confirmed is None  # no WAIT asked for
    assert alone == resumed == Reply(Answer.DONE, ())
    assert refused == Reply(Answer.REFUSED, ())
    # An error stays an error, in its place; the other calls still answer.
    broken = [(scripts.SET_PAUSED, project_keys, ["p", 0]), (scripts.REQUEUE_RUN, [], [])]
    answers, _ = await evalsha_all(fresh_redis, broken)
    assert answers[0] == Reply(Answer.DONE, ()) and isinstance(answers[1], Exception)
    assert await RunStore(fresh_redis, settings).requeue("j.0", 1, "c0ffee00", 0.0, new_attempt=True, reason="x") == 0
