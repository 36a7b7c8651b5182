"""Redis as production runs it when it must survive the loss of a server: a primary, a replica and
three Sentinels, each a real redis-server process on a free port (the tests, `make dev --redis-ha`).

Sentinel settings follow redis.io's Sentinel guide (operate/oss_and_stack/management/sentinel):
a quorum of 2 of 3, the primary's password as `auth-pass`, and a config file of each Sentinel's
own, which it rewrites as the primary changes. `down_after_ms` is short here so a test sees a
failover within seconds; production keeps Redis's defaults or deploy/k8s's values.
"""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis  # the sync client: this is tooling for tests and `make dev`, not a service

from deploy.processes import Process, base_env, free_port, start_redis, wait_redis_ready

MASTER = "bunch"


@dataclass
class RedisHA:
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    password: str | None
    sentinel_password: str | None
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The services' BUNCH_REDIS_URL."""
        credentials = f":{self.password}@" if self.password else ""
        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{credentials}{sentinels}/{MASTER}/0"

    def node_url(self, port: int) -> str:
        """A plain URL of one Redis server (to look at it directly, bypassing Sentinel)."""
        return f"redis://{f':{self.password}@' if self.password else ''}127.0.0.1:{port}/0"

    def primary_named(self) -> int | None:
        """The port the Sentinels agree is the primary's (None while they do not all agree)."""
        named = set()
        for port in self.sentinel_ports:
            client = redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1)
            try:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            except redis.RedisError:
                return None
            finally:
                client.close()
            named.add(int(address[1]) if address else None)
        return named.pop() if len(named) == 1 else None

    def wait_primary(self, port: int, timeout: float = 30.0) -> float:
        """Until every Sentinel names `port` the primary; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.primary_named() == port:
                return time.monotonic() - started
            time.sleep(0.05)
        raise TimeoutError(f"the Sentinels did not agree on 127.0.0.1:{port} as primary within {timeout}s")


def start_redis_ha(
    workdir: Path,
    *,
    password: str | None = None,
    sentinel_password: str | None = None,
    down_after_ms: int = 1000,
    appendonly: bool = True,
) -> RedisHA:
    """Start the primary, its replica and three Sentinels; return once the Sentinels agree."""
    ha = RedisHA(free_port(), free_port(), [free_port() for _ in range(3)], password, sentinel_password)
    try:
        for name, port, extra in (
            ("redis", ha.primary_port, ()),
            ("redis-replica", ha.replica_port, ("--replicaof", "127.0.0.1", str(ha.primary_port))),
        ):
            data = workdir / name
            data.mkdir(parents=True, exist_ok=True)
            ha.processes[name], _ = start_redis(
                data, port, appendonly=appendonly, name=name, password=password, extra_args=extra
            )
        for number, port in enumerate(ha.sentinel_ports, 1):
            name = f"sentinel-{number}"
            ha.processes[name] = _start_sentinel(workdir / name, name, port, ha, down_after_ms)
        ha.wait_primary(ha.primary_port)
        _wait_replica_known(ha)
    except BaseException:
        for proc in ha.processes.values():
            proc.kill()
        raise
    return ha


def _start_sentinel(directory: Path, name: str, port: int, ha: RedisHA, down_after_ms: int) -> Process:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        f"dir {directory}",
        f"sentinel monitor {MASTER} 127.0.0.1 {ha.primary_port} 2",
        f"sentinel down-after-milliseconds {MASTER} {down_after_ms}",
        # Also the wait before a failed failover is tried again: short, so a test does not stall.
        f"sentinel failover-timeout {MASTER} {max(3 * down_after_ms, 3000)}",
        f"sentinel parallel-syncs {MASTER} 1",
    ]
    if ha.password:
        lines.append(f"sentinel auth-pass {MASTER} {ha.password}")
    if ha.sentinel_password:
        lines.append(f"requirepass {ha.sentinel_password}")
    config = directory / "sentinel.conf"
    config.write_text("\n".join(lines) + "\n")
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = Process(name, [binary, str(config), "--sentinel"], base_env(), directory / f"{name}.log").start()
    wait_redis_ready(port, proc, password=ha.sentinel_password)
    return proc


def _wait_replica_known(ha: RedisHA, timeout: float = 30.0) -> None:
    """Until the replica has synced and every Sentinel lists it: only then can it be promoted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = True
        for port in ha.sentinel_ports:
            client = redis.Redis(port=port, password=ha.sentinel_password, socket_timeout=1, decode_responses=True)
            try:
                replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
            except redis.RedisError:
                replicas = []
            finally:
                client.close()
            ready = ready and any(
                _field(r, "port") == str(ha.replica_port) and _field(r, "master-link-status") == "ok" for r in replicas
            )
        if ready:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the Sentinels did not all list the replica within {timeout}s")


def _field(entry: object, name: str) -> str:
    if isinstance(entry, dict):
        return str(entry.get(name, ""))
    if isinstance(entry, list):
        pairs = dict(zip(entry[::2], entry[1::2], strict=False))
        return str(pairs.get(name, ""))
    return ""
