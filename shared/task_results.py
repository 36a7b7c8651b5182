"""The bodies of stream messages that more than one service writes."""

import json
from typing import Any

# What the dispatcher reads of RunPod's body. A webhook body also echoes the run's input (every
# presigned link): carrying it on would only cost the stream memory and the dispatcher parsing.
RESULT_FIELDS = ("id", "status", "output", "error", "delayTime", "executionTime")


def task_result(run_id: str, attempt: int, body: dict[str, Any], source: str) -> dict[str, str]:
    """What RunPod said about one attempt of a run (from its webhook or from /status)."""
    kept = {name: body[name] for name in RESULT_FIELDS if name in body}
    return {"run_id": run_id, "attempt": str(attempt), "body": json.dumps(kept), "source": source}
