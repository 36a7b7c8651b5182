"""A service process from start to end: its settings read, its loops run until SIGTERM or SIGINT,
then each let finish what it holds."""

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from shared import logs
from shared.errors import Misconfigured
from shared.settings import Settings, get_settings

# Its settings cannot work: restarting it will not help (a supervisor may still restart it).
EXIT_MISCONFIGURED = 2


def run_service(
    name: str,
    main: Callable[[Settings], Coroutine[Any, Any, None]],
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run,
) -> None:
    """The entry point of a service: settings read, logs set up, `main` run. Settings that cannot
    work end the process with one line that says what is wrong, not a traceback."""
    try:
        settings = get_settings()
    except (ValidationError, Misconfigured) as exc:
        print(f"{name} cannot start, its settings are invalid: {exc}", file=sys.stderr)
        sys.exit(EXIT_MISCONFIGURED)
    logs.configure(name, settings.log_level)
    try:
        runner(main(settings))
    except Misconfigured as exc:
        logging.getLogger(name).error("%s cannot run: %s", name, exc.message)
        sys.exit(EXIT_MISCONFIGURED)


async def run_until_signalled(loops: list[Callable[[asyncio.Event], Coroutine[Any, Any, None]]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(body(stop)) for body in loops]
    # One loop crashing stops the others too: a half-working service must not look healthy.
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    stop.set()
    await asyncio.gather(*tasks)


def settle_garbage_collector() -> None:
    """Call once a service has started. A request or a run allocates a few hundred containers and
    frees nearly all of them by reference counting, so the default young-generation threshold (700)
    ran a collection every few requests or runs: 20-27 µs of CPU per gateway request in all, 2-4 µs
    with these settings (bench/RESULTS.md). What exists by now (modules, routes, schemas: over
    100,000 objects) lives as long as the process: frozen, full collections no longer walk it."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
