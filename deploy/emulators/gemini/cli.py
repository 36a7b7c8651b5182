"""Running the emulator: as a process (`python -m deploy.emulators.gemini`) or from Python via start()."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from deploy.emulators.gemini.app import create_app
from deploy.emulators.gemini.state import IMAGE_MODES, EmulatorConfig
from deploy.processes import Process, base_env, free_port, python, wait_http


def start(
    workdir: Path,
    port: int | None = None,
    latency_ms: int = 0,
    image_px: int = 256,
    api_keys: Sequence[str] | None = None,
    *,
    batch_pending_seconds: float | None = None,
    batch_running_seconds: float | None = None,
    batch_expire_seconds: float | None = None,
    file_ttl_seconds: float | None = None,
) -> tuple[Process, str]:
    """The emulator as a subprocess on a free port (tests, `make dev`, bench); returns it and its base URL.
    The batch and file times left None keep their defaults (state.EmulatorConfig)."""
    port = port or free_port()
    args = python(
        "-m", "deploy.emulators.gemini", "--host", "127.0.0.1", "--port", str(port),
        "--latency-ms", str(latency_ms), "--image-px", str(image_px),
    )  # fmt: skip
    for key in api_keys or ():
        args += ["--api-key", key]
    times = {
        "--batch-pending-seconds": batch_pending_seconds, "--batch-running-seconds": batch_running_seconds,
        "--batch-expire-seconds": batch_expire_seconds, "--file-ttl-seconds": file_ttl_seconds,
    }  # fmt: skip
    for flag, value in times.items():
        if value is not None:
            args += [flag, str(value)]
    proc = Process("gemini", args, base_env(), workdir / "gemini.log").start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_emulator/stats", proc)
    return proc, url


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.emulators.gemini",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument(
        "--api-key", action="append", dest="api_keys", metavar="KEY",
        help="a key that works (repeatable); without it any non-empty key does",
    )  # fmt: skip
    parser.add_argument("--image-mode", choices=IMAGE_MODES, default="small")
    defaults = EmulatorConfig()
    for flag, what in (
        ("batch_pending_seconds", "how long a batch stays PENDING"),
        ("batch_running_seconds", "how long a batch stays RUNNING at least before its results"),
        ("batch_expire_seconds", "a batch not finished this long after its creation expires (default 48 h)"),
        ("file_ttl_seconds", "uploaded files are deleted this long after their upload (default 48 h)"),
    ):
        parser.add_argument(f"--{flag.replace('_', '-')}", type=float, default=getattr(defaults, flag), help=what)
    args = parser.parse_args(argv)
    for flag in ("batch_pending_seconds", "batch_running_seconds", "batch_expire_seconds", "file_ttl_seconds"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be >= 0")
    app = create_app(
        latency_ms=args.latency_ms, image_px=args.image_px, api_keys=args.api_keys, image_mode=args.image_mode,
        batch_pending_seconds=args.batch_pending_seconds, batch_running_seconds=args.batch_running_seconds,
        batch_expire_seconds=args.batch_expire_seconds, file_ttl_seconds=args.file_ttl_seconds,
    )  # fmt: skip
    # A caller that gives up (client timeout) ends its call here too, as it does at Google: hanging and
    # sleeping calls stop, and they are not counted in the stats as answered.
    web.run_app(
        app, host=args.host, port=args.port, handler_cancellation=True, print=lambda msg: print(msg, flush=True)
    )
