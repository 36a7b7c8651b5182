"""The whole stack on one machine, no Docker and no cloud keys: `python -m deploy.stack` (`make dev`).

redis-server, moto's S3 server, the Gemini and RunPod emulators, and the three services, each a
real process on a free port. The tests and bench/ start the same stack through `start_stack`.
"""

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values
from pydantic import SecretStr

from deploy.processes import (
    ROOT,
    Process,
    base_env,
    free_port,
    python,
    scratch_dir,
    start_redis,
    start_s3,
    wait_http,
)
from deploy.redis_ha import RedisHA, start_redis_ha
from shared.settings import Settings

DEV_API_KEY = "dev-key"
HA_PASSWORD = "local-redis-password"
HA_SENTINEL_PASSWORD = "local-sentinel-password"
DEV_PROJECT = "dev"
EMULATOR_KEY = "emulator-key"
GEMINI_MODULE = ("-m", "deploy.emulators.gemini", "--host", "127.0.0.1")
SERVICES = ("gateway", "dispatcher", "packager")
EMULATORS = ("gemini", "runpod")


@dataclass
class Stack:
    workdir: Path
    redis_url: str
    s3_url: str
    gemini_url: str
    runpod_url: str
    gateway_url: str
    api_keys: str
    service_env: dict[str, str]
    processes: dict[str, Process] = field(default_factory=dict)
    redis_appendonly: bool = False
    redis_ha: RedisHA | None = None  # a primary, a replica and three Sentinels, instead of one Redis
    gateway_ports: dict[int, int] = field(default_factory=dict)  # extra gateway replicas' ports
    metrics_ports: dict[str, int] = field(default_factory=dict)  # dispatcher/packager replicas

    def start_service(
        self, name: str, replica: int = 0, extra_env: Mapping[str, str] | None = None, port: int | None = None
    ) -> Process:
        """Start one replica of gateway, dispatcher or packager (again, after a kill).

        Gateway replica 0 listens on `gateway_url` (RunPod's webhooks go there); other replicas
        get a port of their own (`port`, or a free one), kept when the replica is started again.
        """
        env = base_env({**self.service_env, **(extra_env or {}), "BUNCH_CONSUMER_NAME": f"{name}-{replica}"})
        label = f"{name}-{replica}"
        if name == "gateway":
            url = self.gateway_url_of(replica, port)
            args = python("-m", "services.gateway", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1])
        else:
            args = python("-m", f"services.{name}")
            # Each replica's Prometheus endpoint, kept across restarts of that replica.
            metrics_port = self.metrics_ports.setdefault(label, free_port())
            env["BUNCH_METRICS_PORT"] = str(metrics_port)
        proc = Process(label, args, env, self.workdir / f"{label}.log").start()
        self.processes[label] = proc
        if name == "gateway":
            wait_http(f"{url}/healthz", proc)
        return proc

    def metrics_url(self, label: str) -> str:
        """The /metrics URL of a process: the gateway's own route, or a worker service's port."""
        if label.startswith("gateway"):
            return f"{self.gateway_url_of(int(label.rsplit('-', 1)[1]))}/metrics"
        return f"http://127.0.0.1:{self.metrics_ports[label]}/metrics"

    def gateway_url_of(self, replica: int, port: int | None = None) -> str:
        """The base URL of a gateway replica (choosing its port the first time it is asked for)."""
        if replica == 0 and port is None:
            return self.gateway_url
        if port is not None:
            self.gateway_ports[replica] = port
        return f"http://127.0.0.1:{self.gateway_ports.setdefault(replica, free_port())}"

    def restart_redis(self) -> Process:
        """Start redis-server again on the same port and data directory (after a stop or a kill)."""
        old = self.processes["redis"]
        if old.alive:
            raise RuntimeError("redis-server is still running")
        port = int(self.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        proc, _ = start_redis(self.workdir, port=port, appendonly=self.redis_appendonly)
        self.processes["redis"] = proc
        return proc

    def stop(self) -> None:
        """SIGTERM the services together, then the servers and emulators they used. A service still
        running 10 s later is killed, an emulator (it may hold calls made to hang) 3 s later."""
        services = [p for name, p in self.processes.items() if name.split("-", 1)[0] in SERVICES]
        rest = [p for p in self.processes.values() if p not in services]
        for group in (services, rest):
            for proc in group:
                proc.signal(signal.SIGTERM)
            for proc in group:
                proc.wait(3.0 if proc.name in EMULATORS else 10.0)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{proc.log_tail(60)}" for name, proc in self.processes.items())


def start_stack(
    workdir: Path,
    *,
    api_keys: str = f"{DEV_API_KEY}:{DEV_PROJECT}",
    runpod_workers: int = 8,
    runpod_args: tuple[str, ...] = (),
    gemini_args: tuple[str, ...] = (),
    service_env: Mapping[str, str] | None = None,
    services: tuple[str, ...] = SERVICES,
    gateway_port: int | None = None,
    redis_appendonly: bool = False,
    redis_ha: bool = False,
    worker_env: Mapping[str, str] | None = None,
) -> Stack:
    """Start the stack in `workdir`. `redis_appendonly` turns AOF on (appendfsync everysec), so
    `Stack.restart_redis` finds the data again; `redis_ha` runs Redis behind Sentinel
    (deploy/redis_ha.py, passwords on); `worker_env` reaches the worker handler inside the RunPod
    emulator (e.g. GEMINI_TIMEOUT_SECONDS); `runpod_workers` is how many runs RunPod holds at once
    (worker processes x WORKER_CONCURRENCY)."""
    workdir.mkdir(parents=True, exist_ok=True)
    processes: dict[str, Process] = {}
    ha: RedisHA | None = None
    sentinel_env: dict[str, str] = {}
    try:
        if redis_ha:
            ha = start_redis_ha(workdir, password=HA_PASSWORD, sentinel_password=HA_SENTINEL_PASSWORD)
            processes.update(ha.processes)
            redis_url = ha.url
            sentinel_env["BUNCH_REDIS_SENTINEL_PASSWORD"] = HA_SENTINEL_PASSWORD
        else:
            processes["redis"], redis_url = start_redis(workdir, appendonly=redis_appendonly)
        processes["s3"], s3_url = start_s3(workdir)

        gemini_port = free_port()
        gemini_url = f"http://127.0.0.1:{gemini_port}"
        processes["gemini"] = Process(
            "gemini",
            python(*GEMINI_MODULE, "--port", str(gemini_port), "--api-key", EMULATOR_KEY, *gemini_args),
            base_env(),
            workdir / "gemini.log",
        ).start()

        runpod_port = free_port()
        runpod_url = f"http://127.0.0.1:{runpod_port}"
        # `runpod_workers` is the endpoint's capacity in concurrent jobs. Each worker process is the
        # real runpod SDK running worker/handler.py (~2 s of imports) and holds WORKER_CONCURRENCY
        # jobs, so the fewest processes that give that capacity are started.
        worker_concurrency = int((worker_env or {}).get("WORKER_CONCURRENCY", "4"))
        runpod_env = base_env(
            {
                "GEMINI_BASE_URL": gemini_url,
                "GEMINI_API_KEY": EMULATOR_KEY,
                "WORKER_CONCURRENCY": str(worker_concurrency),
                **(worker_env or {}),
            }
        )
        processes["runpod"] = Process(
            "runpod",
            python(
                "-m",
                "deploy.emulators.runpod",
                "--host",
                "127.0.0.1",
                "--port",
                str(runpod_port),
                "--workers",
                str(max(1, -(-runpod_workers // max(1, worker_concurrency)))),
                "--api-key",
                EMULATOR_KEY,
                "--handler",
                str(ROOT / "worker" / "handler.py"),
                *runpod_args,
            ),
            runpod_env,
            workdir / "runpod.log",
        ).start()
        wait_http(f"{gemini_url}/_emulator/stats", processes["gemini"])
        wait_http(f"{runpod_url}/_emulator/stats", processes["runpod"])
    except BaseException:
        for proc in processes.values():
            proc.stop()
        raise

    gateway_url = f"http://127.0.0.1:{gateway_port or free_port()}"
    env = {
        "BUNCH_REDIS_URL": redis_url,
        "BUNCH_S3_ENDPOINT": s3_url,
        "BUNCH_API_KEYS": api_keys,
        "BUNCH_PUBLIC_URL": gateway_url,
        "BUNCH_RUNPOD_BASE_URL": f"{runpod_url}/v2",
        "BUNCH_RUNPOD_API_KEY": EMULATOR_KEY,
        "BUNCH_RUNPOD_ENDPOINT_ID": "local",
        # The batch lane's own key: the dispatcher calls Gemini's Batch API itself.
        "BUNCH_GEMINI_BASE_URL": gemini_url,
        "BUNCH_GEMINI_API_KEY": EMULATOR_KEY,
        "BUNCH_WEBHOOK_SECRET": "local-webhook-secret",
        "BUNCH_ENV": "development",  # the secrets above are published: only a local stack may use them
        **sentinel_env,
        **(service_env or {}),
    }
    stack = Stack(
        workdir, redis_url, s3_url, gemini_url, runpod_url, gateway_url, api_keys, env, processes, redis_appendonly, ha
    )
    try:
        for name in services:
            stack.start_service(name)
    except BaseException:
        stack.stop()
        raise
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the whole Bunch stack locally.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--runpod-workers", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the data folder on exit")
    parser.add_argument("--redis-ha", action="store_true", help="Redis as a primary, a replica and three Sentinels")
    args = parser.parse_args()
    # The caller's settings (.env, then the environment, as the services themselves read them) win
    # over the stack's: the stack only fills in what they leave unset.
    caller = caller_settings(ROOT / ".env", os.environ)
    workdir = scratch_dir("bunch-dev-")
    port = args.port if _port_free(args.port) else free_port()
    stack = start_stack(
        workdir, runpod_workers=args.runpod_workers, gateway_port=port, redis_ha=args.redis_ha, service_env=caller
    )
    print(banner(stack, caller), flush=True)
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stopping:
            dead = [name for name, proc in stack.processes.items() if not proc.alive]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)}\n{stack.logs()}", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def caller_settings(dotenv: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """The BUNCH_* settings of `.env` and of the environment (which wins, as for the services)."""
    from_file = {k: v for k, v in dotenv_values(dotenv).items() if v is not None} if dotenv.is_file() else {}
    return {k: v for k, v in {**from_file, **environ}.items() if k.startswith("BUNCH_")}


def banner(stack: Stack, caller: Mapping[str, str]) -> str:
    settings = effective_settings(stack.service_env)
    projects = sorted(set(settings.project_for_key().values()))
    if caller.keys() & {"BUNCH_API_KEYS", "BUNCH_API_KEYS_FILE", "BUNCH_API_KEYS_DIR"}:
        # Keys the caller chose are theirs to know: shown nowhere, not even in a terminal's scrollback.
        keys_line = f"API keys     yours, for projects {', '.join(projects) or '(none)'}"
        try_key = "<your key>"
    else:
        keys_line = f"API key      {DEV_API_KEY}  (project '{DEV_PROJECT}')"
        try_key = DEV_API_KEY
    changed = "\n".join(f"  {line}" for line in non_default_settings(settings)) or "  (none)"
    return f"""
Bunch is running (Ctrl-C stops everything).
  API          {stack.gateway_url}   (OpenAPI: {stack.gateway_url}/docs)
  {keys_line}
  Redis        {settings.redis_url if "BUNCH_REDIS_URL" in caller else stack.redis_url}
  S3           {settings.s3_endpoint}  bucket '{settings.s3_bucket}'
  RunPod       {settings.runpod_base_url}/{settings.runpod_endpoint_id}
  Gemini emu   {stack.gemini_url}
  logs         {stack.workdir}

Settings that differ from the defaults (shared/settings.py):
{changed}

Try:
  curl -s -H 'Authorization: Bearer {try_key}' -F files=@some.png {stack.gateway_url}/api/uploads
"""


def effective_settings(env: Mapping[str, str]) -> Settings:
    """The settings the services read from `env` (and nothing else: no .env, no other variable)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings(_env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def non_default_settings(settings: Settings) -> list[str]:
    lines = []
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if value != info.get_default(call_default_factory=True):  # SecretStr compares its values
            shown = "(secret)" if isinstance(value, SecretStr) else value
            lines.append(f"BUNCH_{name.upper()}={shown}")
    return lines


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    main()
