"""Messages of keys.TASK_RESULTS_STREAM: what RunPod said about one attempt of a run, written by the
gateway (from RunPod's webhook) and by the dispatcher (from /status)."""

import json
from typing import Any

from redis.asyncio import Redis

from shared import keys

# What the dispatcher reads of RunPod's body. A webhook body also echoes the run's input (every
# presigned link): carrying it on would only cost the stream memory and the dispatcher parsing.
RESULT_FIELDS = ("id", "status", "output", "error", "delayTime", "executionTime")


def task_result(run_id: str, attempt: int, claim: str, body: dict[str, Any], source: str) -> dict[str, str]:
    """What RunPod said about one claim of a run (from its webhook or from /status)."""
    kept = {name: body[name] for name in RESULT_FIELDS if name in body}
    return {"run_id": run_id, "attempt": str(attempt), "claim": claim, "body": json.dumps(kept), "source": source}


async def publish(redis: Redis, run_id: str, attempt: int, claim: str, body: dict[str, Any], source: str) -> None:
    """Hand RunPod's word on one claim of a run to the dispatchers (keys.TASK_RESULTS_STREAM)."""
    await redis.xadd(keys.TASK_RESULTS_STREAM, task_result(run_id, attempt, claim, body, source))
