"""Another project's requests while an attack runs, measured from their own process.

    python -m tests.security.victim <gateway url> <api key> <path> <seconds>

prints {"latencies_ms": [...], "errors": [...]}: one GET every INTERVAL_S on one keep-alive
connection. A process of its own, so the attacker's work in the test process cannot delay the
victim's client and be blamed on the gateway.
"""

import http.client
import json
import sys
import time
from typing import Any
from urllib.parse import urlsplit

INTERVAL_S = 0.02


def measure(url: str, api_key: str, path: str, seconds: float) -> dict[str, list[Any]]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    headers = {"Authorization": f"Bearer {api_key}"}
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            connection.close()
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(INTERVAL_S)
    connection.close()
    return {"latencies_ms": latencies, "errors": errors}


if __name__ == "__main__":
    url, api_key, path, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    print(json.dumps(measure(url, api_key, path, seconds)))
