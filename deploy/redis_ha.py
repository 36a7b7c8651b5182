"""Redis as production runs it when it must survive the loss of a server: a primary, a replica and
three Sentinels, each a real redis-server process on a free port (the tests, `make dev --redis-ha`).

Sentinel settings follow redis.io's Sentinel guide (operate/oss_and_stack/management/sentinel):
a quorum of 2 of 3, the primary's password as `auth-pass`, and a config file of each Sentinel's
own, which it rewrites as the primary changes. `down_after_ms` is short here so a test sees a
failover within seconds; production keeps Redis's defaults or deploy/k8s's values.

With `tls` (TlsFiles, e.g. from make_test_certificates) every process listens with TLS only
(`port 0`, `tls-port`), replication and the Sentinels' own connections use TLS too, and `url` is a
`rediss+sentinel://` URL: BUNCH_REDIS_TLS_CA_FILE must then name `tls.ca`.
"""

import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis  # the sync client: this is tooling for tests and `make dev`, not a service

from deploy.processes import Process, base_env, free_port, start_redis, wait_redis_ready

MASTER = "bunch"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signed the certificate every process serves, that certificate, its key."""

    ca: Path
    cert: Path
    key: Path

    def server_args(self) -> tuple[str, ...]:
        """redis-server's TLS options (a port of its own comes with them: --port 0 --tls-port N).
        Clients need no certificate; replicas connect to their primary with TLS."""
        return (
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no", "--tls-replication", "yes"),
        )


@dataclass
class RedisHA:
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    password: str | None
    sentinel_password: str | None
    processes: dict[str, Process] = field(default_factory=dict)
    tls: TlsFiles | None = None

    @property
    def url(self) -> str:
        """The services' BUNCH_REDIS_URL (with `tls`, BUNCH_REDIS_TLS_CA_FILE must name tls.ca)."""
        credentials = f":{self.password}@" if self.password else ""
        sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"{'rediss' if self.tls else 'redis'}+sentinel://{credentials}{sentinels}/{MASTER}/0"

    def node_url(self, port: int) -> str:
        """A URL of one Redis server (to look at it directly, bypassing Sentinel); rediss:// with `tls`."""
        return (
            f"{'rediss' if self.tls else 'redis'}://{f':{self.password}@' if self.password else ''}127.0.0.1:{port}/0"
        )

    def client(self, port: int, password: str | None, **options: Any) -> redis.Redis:
        """A sync client of the process on `port` (with TLS when the cluster has it)."""
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=str(self.tls.ca))
        return redis.Redis(host="127.0.0.1", port=port, password=password, **options)

    def primary_named(self) -> int | None:
        """The port the Sentinels agree is the primary's (None while they do not all agree)."""
        named = set()
        for port in self.sentinel_ports:
            client = self.client(port, self.sentinel_password, socket_timeout=1)
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
    tls: TlsFiles | None = None,
) -> RedisHA:
    """Start the primary, its replica and three Sentinels; return once the Sentinels agree.
    With `tls` all of them listen with TLS only, and talk to each other with it."""
    ha = RedisHA(free_port(), free_port(), [free_port() for _ in range(3)], password, sentinel_password, tls=tls)
    try:
        for name, port, extra in (
            ("redis", ha.primary_port, ()),
            ("redis-replica", ha.replica_port, ("--replicaof", "127.0.0.1", str(ha.primary_port))),
        ):
            data = workdir / name
            data.mkdir(parents=True, exist_ok=True)
            if tls is None:
                ha.processes[name], _ = start_redis(
                    data, port, appendonly=appendonly, name=name, password=password, extra_args=extra
                )
            else:  # start_redis waits with a plain PING: the same server, TLS-only, waited for with TLS
                ha.processes[name] = _start_redis_tls(data, name, port, ha, appendonly, extra)
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
        *(_sentinel_tls_lines(port, ha.tls) if ha.tls else [f"port {port}"]),
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
    if ha.tls:
        _wait_tls_ready(ha, port, proc, ha.sentinel_password)
    else:
        wait_redis_ready(port, proc, password=ha.sentinel_password)
    return proc


def _sentinel_tls_lines(port: int, tls: TlsFiles) -> list[str]:
    """A Sentinel that listens with TLS only and uses TLS to the Redis servers and the other Sentinels."""
    return [
        "port 0",
        f"tls-port {port}",
        f"tls-cert-file {tls.cert}",
        f"tls-key-file {tls.key}",
        f"tls-ca-cert-file {tls.ca}",
        "tls-auth-clients no",
        "tls-replication yes",
    ]


def _start_redis_tls(
    directory: Path, name: str, port: int, ha: RedisHA, appendonly: bool, extra: tuple[str, ...]
) -> Process:
    """deploy.processes.start_redis's server, listening with TLS only."""
    assert ha.tls is not None
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    args = [
        *(binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *("--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"),
        *(("--requirepass", ha.password, "--masterauth", ha.password) if ha.password else ()),
        *ha.tls.server_args(),
        *extra,
    ]
    proc = Process(name, args, base_env(), directory / f"{name}.log").start()
    _wait_tls_ready(ha, port, proc, ha.password)
    return proc


def _wait_tls_ready(ha: RedisHA, port: int, process: Process, password: str | None, timeout: float = 30.0) -> None:
    """wait_redis_ready over TLS: until the process answers PING (not LOADING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive:
            raise RuntimeError(f"{process.name} exited early:\n{process.log_tail()}")
        client = ha.client(port, password, socket_timeout=1, socket_connect_timeout=1)
        try:
            if client.ping():
                return
        except redis.RedisError:
            pass
        finally:
            client.close()
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on TLS port {port} was not ready within {timeout}s\n{process.log_tail()}")


def _wait_replica_known(ha: RedisHA, timeout: float = 30.0) -> None:
    """Until the replica has synced and every Sentinel lists it: only then can it be promoted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = True
        for port in ha.sentinel_ports:
            client = ha.client(port, ha.sentinel_password, socket_timeout=1, decode_responses=True)
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


def make_test_certificates(directory: Path, days: int = 2) -> TlsFiles:
    """A throwaway CA and a certificate it signs for 127.0.0.1 and localhost (server and client
    use), made with the openssl command; for tests and `make dev`, never for production."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "openssl.cnf"
    config.write_text(
        "[req]\nprompt = no\ndistinguished_name = dn\n"
        "[dn]\nCN = Bunch test CA\n"
        "[ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n"
        "subjectKeyIdentifier = hash\n"
        "[server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n"
    )
    tls = TlsFiles(ca=directory / "ca.crt", cert=directory / "server.crt", key=directory / "server.key")
    ca_key, request = directory / "ca.key", directory / "server.csr"
    new_key = ("-new", "-nodes", "-newkey", "rsa:2048", "-config", config)
    sign = ("-CA", tls.ca, "-CAkey", ca_key, "-CAcreateserial", "-extfile", config, "-extensions", "server")
    openssl = shutil.which("openssl") or "/usr/bin/openssl"
    for command in (
        ("req", "-x509", *new_key, "-extensions", "ca", "-days", days, "-keyout", ca_key, "-out", tls.ca),
        ("req", *new_key, "-subj", "/CN=localhost", "-keyout", tls.key, "-out", request),
        ("x509", "-req", "-in", request, *sign, "-days", days, "-out", tls.cert),
    ):
        subprocess.run([openssl, *map(str, command)], check=True, capture_output=True)
    return tls
