"""Container healthcheck for the services without an HTTP port: `python -m shared.probe`.

Exits 0 when Redis, the state of record, answers; otherwise 1, printing why (unreachable, a wrong
password, a master no Sentinel knows). The service's own loops reconnect by themselves.
"""

import asyncio
import sys

from shared.errors import Misconfigured, Unavailable
from shared.redis_connection import check, connect
from shared.settings import get_settings


async def _problem() -> str | None:
    redis = connect(get_settings())
    try:
        await asyncio.wait_for(check(redis), 8)
    except (Misconfigured, Unavailable) as exc:
        return exc.message
    except TimeoutError:
        return "Redis did not answer within 8 s"
    finally:
        await redis.aclose()
    return None


if __name__ == "__main__":
    problem = asyncio.run(_problem())
    if problem:
        print(f"not ready: {problem}", file=sys.stderr)
    sys.exit(1 if problem else 0)
