"""The operator's view of the upstream hold: `python -m services.dispatcher.hold [show|release]`.

A hold for a refused key or a billing problem has no end of its own: once the key or the account
is fixed, an operator releases it here (in a dispatcher container: the same settings reach Redis).
A daily-quota hold ends by itself at midnight Pacific time; releasing it early just lets runs fail
with quota_exhausted again until the quota is back.
"""

import argparse
import asyncio
import sys

from shared.redis_connection import connect
from shared.settings import get_settings
from shared.stores.upstream import UpstreamStore
from shared.times import iso


async def _main(action: str) -> int:
    redis = connect(get_settings())
    try:
        store = UpstreamStore(redis)
        hold = await store.current()
        if action == "release":
            released = await store.release()
            print("released the hold" if released else "there was no hold")
            return 0
        if hold is None:
            print("no hold: runs start as capacity allows")
            return 0
        ends = iso(hold.until) if hold.until else "when an operator releases it"
        print(f"held since {iso(hold.since)} ({hold.reason}): {hold.detail}\nends: {ends}")
        return 0
    finally:
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=["show", "release"], default="show")
    sys.exit(asyncio.run(_main(parser.parse_args().action)))
