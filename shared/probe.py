"""Container healthcheck for the services without an HTTP port: `python -m shared.probe`.

Exits 0 when Redis, the state of record, answers; the service's own loops reconnect by themselves.
"""

import asyncio
import sys

from shared.settings import get_settings
from shared.streams import connect


async def _ping() -> bool:
    redis = connect(get_settings())
    try:
        return bool(await asyncio.wait_for(redis.ping(), 3))
    except Exception:
        return False
    finally:
        await redis.aclose()


if __name__ == "__main__":
    sys.exit(0 if asyncio.run(_ping()) else 1)
