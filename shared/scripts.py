"""Every Lua script, one file each in shared/lua/, loaded once when this module is imported.

Every state change that must be atomic across replicas happens in one of these. Each file opens
with what it does, its KEYS, its ARGV and what it returns; a line `--- @include "name"` pulls in a
helper file of shared/lua/include/ (each once, in order, its own includes first). Every script
starts with a prelude generated here: the functions that build per-job, per-run and per-project
key names and the fixed key names (from shared.keys), the state machines and status sets (from
shared.models) and the answer codes (below), so each of those is written once, in Python.

Every script returns a table whose first element is an `Answer` and whose rest are the values
that answer carries, fixed ones flat and a list of any length as one nested table: `{DONE}`,
`{REFUSED, status}`, `{MISSING, {positions}}`. `reply` reads that, and nothing else does.

Scripts reach keys they derive at run time, so this assumes one Redis (or one hash slot), not
Redis Cluster.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from hashlib import sha1
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from shared import keys
from shared.models import FINAL_JOB_STATUSES, JOB_TRANSITIONS, LIVE_JOB_STATUSES, RUN_TRANSITIONS

LUA_DIR = Path(__file__).with_name("lua")
_INCLUDE = re.compile(r'^--- @include "(\w+)"\n', re.M)


class Answer(IntEnum):
    """What a script answers first: the one set of return codes (Lua has them by these names)."""

    REFUSED = 0  # the state forbids it (a stale attempt, a status that does not allow it): nothing changed
    DONE = 1
    OVER_QUOTA = 2  # an operator's quota: nothing changed
    ARCHIVED = 3  # the job's records are in its archive: restore it first
    MISSING = 4  # keys the change needs do not exist: nothing changed
    RECLAIMED = 5  # an upload's abandoned deletion was taken back: store its object again
    REPLAY = 6  # the same request was answered before: here is that answer
    BUSY = 7  # the same request is being answered right now: wait for it


@dataclass(frozen=True, slots=True)
class Reply:
    """A script's result, read."""

    answer: Answer
    values: tuple[Any, ...]  # what the script returned after its answer

    @property
    def done(self) -> bool:
        return self.answer == Answer.DONE


def reply(raw: Any) -> Reply:
    """The only place a raw script result is read: `{answer, values...}`."""
    if not isinstance(raw, list) or not raw:
        raise TypeError(f"a script returned {raw!r}, not a table opening with its answer")
    return Reply(Answer(raw[0]), tuple(raw[1:]))


KEY_FUNCTIONS: dict[str, Callable[[str], str]] = {
    "job_key": keys.job,
    "images_key": keys.job_images,
    "run_key": keys.run,
    "project_queue": keys.project_queue,
    "project_running": keys.project_running,
    "project_retries": keys.project_retries,
    "project_runs_waiting": keys.project_runs_waiting,
    "project_live_images": keys.project_live_images,
    "project_live_jobs": keys.project_live_jobs,
    "project_failed_jobs": keys.project_failed_jobs,
    "project_submissions": keys.project_submissions,
    "project_paused": keys.project_paused,
    "project_counts": keys.project_counts,
    "project_hourly": keys.project_hourly,
    "project_jobs": keys.project_jobs,
    "group_jobs": keys.group_jobs,
    "group_key": keys.group,
    "project_groups": keys.project_groups,
    "project_batch_queue": keys.project_batch_queue,
    "project_batch_in_flight": keys.project_batch_in_flight,
    "project_batch_images": keys.project_batch_images,
    "project_spend": keys.project_spend,
    "saved_batch_key": keys.saved_batch,
    "saved_batch_jobs": keys.saved_batch_jobs,
    "project_saved_batches": keys.project_saved_batches,
    "project_active_exports": keys.project_active_exports,
}
KEY_NAMES: dict[str, str] = {
    "RUNNING": keys.RUNNING,
    "RETRY": keys.RETRY_QUEUE,
    "READY": keys.READY,
    "PASSES": keys.PASSES,
    "VTIME": keys.VIRTUAL_TIME,
    "WEIGHTS": keys.WEIGHTS,
    "BACKLOG": keys.BACKLOG,
    "BACKLOG_WEIGHT": keys.BACKLOG_WEIGHT,
    "JOB_COUNTS": keys.JOB_COUNTS,
    "BUCKET": keys.DISPATCH_BUCKET,
    "RUN_SECONDS": keys.RUN_SECONDS,
    "HOLD": keys.UPSTREAM_HOLD,
    "EVENTS": keys.EVENTS_STREAM,
    "PACKAGING": keys.PACKAGING_STREAM,
    "NOTIFY": keys.NOTIFICATIONS_STREAM,
    "CONTROL": keys.CONTROL_STREAM,
    "JOB_SEQ": keys.JOB_SEQUENCE,
    "JOBS_CHANNEL": keys.JOBS_CHANNEL,
    "UPLOADS_BY_USE": keys.UPLOADS_BY_USE,
    "DATASETS_BY_USE": keys.DATASETS_BY_USE,
    "UPLOADS_PURGING": keys.UPLOADS_PURGING,
    "BATCH_READY": keys.BATCH_READY,
    "BATCH_IN_FLIGHT": keys.BATCH_IN_FLIGHT,
    "BATCH_RETRY": keys.BATCH_RETRY_QUEUE,
    "BATCH_SECONDS": keys.BATCH_SECONDS,
    "BUDGETS": keys.BUDGETS,
    "BUDGET_PAUSES": keys.BUDGET_PAUSES,
    "EXPORTS": keys.EXPORTS_STREAM,
    "EXPORTS_BY_TIME": keys.EXPORTS_BY_TIME,
}


def _lua_key_function(name: str, builder: Callable[[str], str]) -> str:
    head, _, tail = builder("\0").partition("\0")
    return f"local function {name}(x) return '{head}' .. x .. '{tail}' end\n"


def _lua_set(values: Sequence[str]) -> str:
    return "{" + ", ".join(f"{value} = true" for value in sorted(values)) + "}"


def _lua_machine(transitions: Mapping[Any, frozenset[Any]]) -> str:
    return "{" + ", ".join(f"{state} = {_lua_set(list(following))}" for state, following in transitions.items()) + "}"


PRELUDE = (
    "".join(_lua_key_function(name, builder) for name, builder in KEY_FUNCTIONS.items())
    + "".join(f"local {name} = '{value}'\n" for name, value in KEY_NAMES.items())
    + "".join(f"local {answer.name} = {answer.value}\n" for answer in Answer)
    + f"local FINAL = {_lua_set(list(FINAL_JOB_STATUSES))}\n"
    + f"local LIVE = {_lua_set(list(LIVE_JOB_STATUSES))}\n"
    + f"local JOB_NEXT = {_lua_machine(JOB_TRANSITIONS)}\n"
    + f"local RUN_NEXT = {_lua_machine(RUN_TRANSITIONS)}\n"
    + """
local function job_may(old, new)
  local allowed = JOB_NEXT[old or '']
  return allowed ~= nil and allowed[new] == true
end
local function run_may(old, new)
  local allowed = RUN_NEXT[old or '']
  return allowed ~= nil and allowed[new] == true
end
"""
)


def _with_includes(text: str, included: set[str]) -> str:
    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in included:
            return ""
        included.add(name)
        return _with_includes((LUA_DIR / "include" / f"{name}.lua").read_text(), included) + "\n"

    return _INCLUDE.sub(expand, text)


def source(name: str, prefix: str = "") -> str:
    """The whole text of script `name` as Redis runs it: the prelude, `prefix`, its includes, itself."""
    return PRELUDE + prefix + _with_includes((LUA_DIR / f"{name}.lua").read_text(), set())


@dataclass(frozen=True)
class Script:
    """One script, called by its SHA; loaded into Redis again when Redis does not know it (a restart,
    a failover, SCRIPT FLUSH)."""

    name: str
    text: str

    @property
    def sha(self) -> str:
        return _sha(self.text)

    async def __call__(self, redis: Redis, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Reply:
        try:
            return reply(await redis.evalsha(self.sha, len(keys), *keys, *args))
        except NoScriptError:
            await redis.script_load(self.text)
            return reply(await redis.evalsha(self.sha, len(keys), *keys, *args))


@cache
def _sha(text: str) -> str:
    return sha1(text.encode()).hexdigest()


def load(name: str, prefix: str = "") -> Script:
    return Script(name, source(name, prefix))


def queue_figures(fields: Sequence[str] = ()) -> Script:
    """The status view's script, reading the job's `fields` too (written into it: two dozen names
    sent as ARGV cost the gateway more CPU than the rest of the call)."""
    if not all(re.fullmatch(r"\w+", name) for name in fields):
        raise ValueError(f"not plain field names: {fields}")
    names = ", ".join(f"'{name}'" for name in fields)
    return load("queue_figures", f"local FIELDS = {{{names}}}\n")


RECORD_STARTED_AND_CLAIM = load("record_started_and_claim")
QUEUE_FIGURES = queue_figures()
SET_PAUSED = load("set_paused")
HOLD_UPSTREAM = load("hold_upstream")
SET_WEIGHTS = load("set_weights")
RELEASE_RUN_SLOTS = load("release_run_slots")
SET_PRIORITY = load("set_priority")
REQUEUE_RUN = load("requeue_run")
COMPLETE_RUN = load("complete_run")
TRANSITION_JOB = load("transition_job")
CANCEL = load("cancel")
DROP_ARCHIVED = load("drop_archived")
RESTORE = load("restore")
REDO = load("redo")
CREATE = load("create")
RESOLVE_GROUP = load("resolve_group")
CREATE_GROUP = load("create_group")
FORGET_CONSUMERS = load("forget_consumers")
TRIM_ACKNOWLEDGED = load("trim_acknowledged")
USE_UPLOAD = load("use_upload")
CLAIM_UPLOAD = load("claim_upload")
RESUME_BUDGET_PAUSES = load("resume_budget_pauses")
CLAIM_BATCH_RUNS = load("claim_batch_runs")
TAKE_DUE_BATCHES = load("take_due_batches")
MARK_BATCH = load("mark_batch")
SAVE_BATCH = load("save_batch")
DELETE_SAVED_BATCH = load("delete_saved_batch")
CLAIM_IDEMPOTENCY_KEY = load("claim_idempotency_key")
ANSWER_IDEMPOTENCY_KEY = load("answer_idempotency_key")
RELEASE_IDEMPOTENCY_KEY = load("release_idempotency_key")
CREATE_EXPORT = load("create_export")
START_EXPORT = load("start_export")
SETTLE_EXPORT_OBJECTS = load("settle_export_objects")
FINISH_EXPORT = load("finish_export")
