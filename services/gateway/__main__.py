"""The gateway process: `python -m services.gateway [--host H] [--port P]`."""

import argparse
import signal
import sys

from services.gateway import server
from services.gateway.app import create_app
from shared.lifecycle import run_service
from shared.redis_connection import refuse_misconfigured
from shared.secret_policy import refuse_unsafe_secrets
from shared.settings import Settings, get_settings


async def preflight(settings: Settings) -> None:
    """Settings that cannot work stop the gateway here, with a line that says why; a Redis that is
    only unreachable does not (/readyz answers 503 until it is back)."""
    refuse_unsafe_secrets(settings)
    await refuse_misconfigured(settings)


def main() -> None:
    parser = argparse.ArgumentParser(description="Bunch gateway")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    run_service("gateway", preflight)
    settings = get_settings()
    # uvicorn re-raises SIGTERM once it has shut down gracefully, which would end the process
    # "killed by signal"; a clean shutdown should exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(create_app(), args.host, args.port, settings)


if __name__ == "__main__":
    main()
