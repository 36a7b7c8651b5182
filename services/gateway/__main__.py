"""The gateway process: `python -m services.gateway [--host H] [--port P]`."""

import argparse
import signal
import sys

from services.gateway import server
from services.gateway.app import create_app
from shared import logs
from shared.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description="Bunch gateway")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = get_settings()
    logs.configure("gateway", settings.log_level)
    # uvicorn re-raises SIGTERM once it has shut down gracefully, which would end the process
    # "killed by signal"; a clean shutdown should exit 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(create_app(), args.host, args.port, settings)


if __name__ == "__main__":
    main()
