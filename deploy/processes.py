"""Start and stop the local processes of the stack (used by `make dev`, the tests and bench/)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> "Process":
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive and self.popen is not None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive:
            self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 10.0) -> int | None:
        """Wait for the process to exit (SIGKILL it after `timeout`); returns its exit status."""
        if self.popen is None:
            return None
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_http(url: str, process: Process | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive:
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    tail = process.log_tail() if process else ""
    raise TimeoutError(f"{url} did not answer within {timeout}s\n{tail}")


def wait_redis_ready(
    port: int, process: Process | None = None, timeout: float = 30.0, password: str | None = None
) -> None:
    """Until redis-server answers PING. Its port opens before it has read its AOF, and until then
    every command is refused with LOADING: a restarted Redis is not back before that."""
    deadline = time.monotonic() + timeout
    hello = (f"AUTH {password}\r\n" if password else "").encode() + b"PING\r\n"
    while time.monotonic() < deadline:
        if process is not None and not process.alive:
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(hello)
            if conn.recv(64).replace(b"+OK\r\n", b"", 1 if password else 0).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {port} was not ready within {timeout}s")


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUNCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_redis(
    workdir: Path,
    port: int | None = None,
    appendonly: bool = False,
    *,
    name: str = "redis",
    password: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[Process, str]:
    """A private redis-server (Redis >= 7) on a free port, its data in `workdir`."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = port or free_port()
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        *(("--requirepass", password, "--masterauth", password) if password else ()),
        *extra_args,
    ]
    proc = Process(name, args, base_env(), workdir / f"{name}.log").start()
    wait_redis_ready(port, proc, password=password)
    return proc, f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"


def start_s3(workdir: Path, port: int | None = None) -> tuple[Process, str]:
    """moto's S3-compatible server on a free port."""
    port = port or free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = Process("s3", [str(moto), "-H", "127.0.0.1", "-p", str(port)], base_env(), workdir / "s3.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", proc)
    return proc, url


def scratch_dir(prefix: str = "bunch-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
