"""BUNCH_REDIS_URL behind Sentinel, on real processes (a primary, a replica and three Sentinels, all
redis-server on free ports, passwords on): URLs parsed, each bad configuration named by the
services instead of a traceback loop, and a client that follows a failover by itself."""

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from deploy.processes import Process, base_env, free_port, python, scratch_dir, wait_http
from deploy.redis_ha import MASTER, RedisHA, start_redis_ha
from shared import scripts
from shared.errors import Misconfigured, Unavailable
from shared.lifecycle import EXIT_MISCONFIGURED
from shared.redis_connection import SentinelAddress, check, connect, parse_sentinel_url, redact
from shared.settings import Settings

pytestmark = pytest.mark.timeout(120)

PASSWORD = "primary-password"
SENTINEL_PASSWORD = "sentinel-password"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://:pw@h1:26379,h2:26380/bunch/2",
            SentinelAddress((("h1", 26379), ("h2", 26380)), "bunch", 2, None, "pw", False),
        ),
        ("rediss+sentinel://user:p%40ss@h1/bunch", SentinelAddress((("h1", 26379),), "bunch", 0, "user", "p@ss", True)),
        ("redis+sentinel://[::1]:5000/m", SentinelAddress((("::1", 5000),), "m", 0, None, None, False)),
        ("redis://:pw@127.0.0.1:6379/0", None),
        ("rediss://127.0.0.1:6379/0", None),
    ],
)
def test_sentinel_urls_are_read(url: str, expected: SentinelAddress | None) -> None:
    assert parse_sentinel_url(url) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://:pw@h1:26379", "must end in /<master-name>[/<db>]"),
        ("redis+sentinel://h1:26379/bunch/0/extra", "must end in /<master-name>[/<db>]"),
        ("redis+sentinel://h1:26379/bunch/zero", "must be a number"),
        ("redis+sentinel:///bunch", "names no Sentinel"),
        ("redis+sentinel://h1:port/bunch", "give host:port"),
        ("redis+sentinel://h1:70000/bunch", "give host:port"),
    ],
)
def test_malformed_sentinel_urls_say_what_is_wrong_without_the_password(url: str, says: str) -> None:
    with pytest.raises(Misconfigured) as caught:
        parse_sentinel_url(url)
    assert says in caught.value.message
    assert ":pw@" not in caught.value.message
    assert redact("redis+sentinel://user:secret@h1:1/m") == "redis+sentinel://user:***@h1:1/m"


@pytest.fixture(scope="module")
def ha_dir() -> Iterator[Path]:
    path = scratch_dir("bunch-sentinel-")
    yield path


@pytest.fixture(scope="module")
def ha(ha_dir: Path) -> Iterator[RedisHA]:
    cluster = start_redis_ha(ha_dir / "shared", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)
    yield cluster
    for proc in cluster.processes.values():
        proc.kill()


def sentinel_url(ha: RedisHA, *, password: str = PASSWORD, master: str = MASTER, ports: list[int] | None = None) -> str:
    sentinels = ",".join(f"127.0.0.1:{port}" for port in ports or ha.sentinel_ports)
    return f"redis+sentinel://:{password}@{sentinels}/{master}/0"


def settings_for(url: str, sentinel_password: str = SENTINEL_PASSWORD) -> Settings:
    return Settings(redis_url=url, redis_sentinel_password=sentinel_password)


@pytest.fixture
async def client(ha: RedisHA) -> AsyncIterator[Redis]:
    redis = connect(settings_for(ha.url))
    yield redis
    await redis.aclose()


async def test_a_sentinel_url_reaches_the_primary(ha: RedisHA, client: Redis) -> None:
    await check(client)
    await client.set("bunch:test:written", "1")
    role = await client.execute_command("ROLE")
    assert role[0] == "master"
    address = client.connection_pool.connection_kwargs
    assert address["db"] == 0
    direct = Redis.from_url(ha.node_url(ha.primary_port), decode_responses=True)
    try:
        assert await direct.get("bunch:test:written") == "1"
    finally:
        await direct.aclose()


async def problem_of(settings: Settings) -> Misconfigured | Unavailable:
    redis = connect(settings)
    try:
        with pytest.raises((Misconfigured, Unavailable)) as caught:
            await check(redis)
        assert isinstance(caught.value, Misconfigured | Unavailable)
        return caught.value
    finally:
        await redis.aclose()


async def test_each_bad_configuration_is_named(ha: RedisHA) -> None:
    closed = [free_port(), free_port()]
    cases: list[tuple[Settings, type[Exception], str]] = [
        (settings_for(sentinel_url(ha, master="nope")), Misconfigured, "no Sentinel monitors a master named 'nope'"),
        (settings_for(sentinel_url(ha, password="wrong")), Misconfigured, "refused the credentials of BUNCH_REDIS_URL"),
        (settings_for(ha.url, "wrong"), Misconfigured, "refused the password of BUNCH_REDIS_SENTINEL_PASSWORD"),
        (settings_for(sentinel_url(ha, ports=closed)), Unavailable, "no Sentinel is reachable"),
        # A Redis port given as a Sentinel's: it answers, but not as a Sentinel.
        (settings_for(sentinel_url(ha, ports=[ha.replica_port]), PASSWORD), Misconfigured, "not answer as a Sentinel"),
        (settings_for(f"redis://127.0.0.1:{closed[0]}/0"), Unavailable, f"at 127.0.0.1:{closed[0]} does not answer"),
        (
            settings_for(ha.node_url(ha.primary_port).replace(PASSWORD, "wrong")),
            Misconfigured,
            "refused the credentials",
        ),
    ]
    for settings, kind, says in cases:
        problem = await problem_of(settings)
        assert isinstance(problem, kind), (settings.redis_url, problem)
        assert says in problem.message, (settings.redis_url, problem.message)
        assert PASSWORD not in problem.message and SENTINEL_PASSWORD not in problem.message


def start(name: str, workdir: Path, env: dict[str, str], *args: str) -> Process:
    module = "shared.probe" if name == "probe" else f"services.{name}"
    env = base_env({"BUNCH_ENV": "development", "BUNCH_CONSUMER_NAME": f"{name}-test", **env})
    return Process(name, python("-m", module, *args), env, workdir / f"{name}-{time.monotonic_ns()}.log").start()


async def exited(proc: Process, within: float = 30) -> int:
    assert proc.popen is not None
    return await asyncio.to_thread(proc.popen.wait, within)


async def test_services_stop_with_the_reason_when_the_settings_cannot_work(ha: RedisHA, ha_dir: Path) -> None:
    cases = [
        (
            "dispatcher",
            sentinel_url(ha, master="nope"),
            SENTINEL_PASSWORD,
            "no Sentinel monitors a master named 'nope'",
        ),
        ("packager", sentinel_url(ha, password="wrong"), SENTINEL_PASSWORD, "refused the credentials"),
        ("gateway", ha.url, "wrong", "refused the password of BUNCH_REDIS_SENTINEL_PASSWORD"),
        ("dispatcher", "redis+sentinel://127.0.0.1:1", "", "must end in /<master-name>"),
    ]
    procs = [
        start(name, ha_dir, {"BUNCH_REDIS_URL": url, "BUNCH_REDIS_SENTINEL_PASSWORD": sentinel_password})
        for name, url, sentinel_password, _ in cases
    ]
    codes = await asyncio.gather(*(exited(proc) for proc in procs))
    for proc, code, (name, _, _, says) in zip(procs, codes, cases, strict=True):
        log = proc.log_path.read_text()
        assert code == EXIT_MISCONFIGURED, (name, code, log)
        assert says in log and "cannot run" in log, log
        assert "Traceback" not in log, log


async def test_unreachable_sentinels_are_waited_for_and_reported(ha: RedisHA, ha_dir: Path, s3_url: str) -> None:
    closed = [free_port(), free_port(), free_port()]
    env = {
        "BUNCH_REDIS_URL": sentinel_url(ha, ports=closed),
        "BUNCH_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        "BUNCH_S3_ENDPOINT": s3_url,
    }
    port = free_port()
    dispatcher = start("dispatcher", ha_dir, env)
    gateway = start("gateway", ha_dir, env, "--host", "127.0.0.1", "--port", str(port))
    try:
        probe = start("probe", ha_dir, env)
        assert await exited(probe) == 1
        assert "not ready: no Sentinel is reachable" in probe.log_path.read_text()
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz", gateway)
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503
        assert ready.json()["redis_problem"].startswith("no Sentinel is reachable (127.0.0.1:"), ready.json()
        await asyncio.sleep(2.5)  # a few connection attempts
        assert dispatcher.alive  # waiting, not crashing in a loop
        log = dispatcher.log_path.read_text()
        assert "waiting for Redis: no Sentinel is reachable" in log, log
        assert log.count("waiting for Redis") == 1, log  # one line per 10 s, not one per attempt
        assert "Traceback" not in log, log
    finally:
        for proc in (dispatcher, gateway):
            proc.signal(signal.SIGTERM)
            proc.wait(10)


async def test_a_client_follows_a_failover_and_reloads_its_scripts(ha_dir: Path) -> None:
    # A cluster of its own: this one loses its primary.
    cluster = start_redis_ha(ha_dir / "failover", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD)
    redis = connect(settings_for(cluster.url))
    try:
        await redis.xgroup_create("bunch:test:stream", "g", mkstream=True)
        await scripts.FORGET_CONSUMERS(redis, ["bunch:test:stream"], ["g", 1000, "c"])  # loads it
        await redis.set("bunch:test:before", "1")
        await redis.execute_command("WAIT", 1, 1000)  # on the replica before the primary goes
        cluster.processes["redis"].kill()
        killed = time.monotonic()
        while True:
            try:
                await redis.set("bunch:test:after", "1")
                break
            except Exception:
                assert time.monotonic() - killed < 30, "no new primary within 30 s"
                await asyncio.sleep(0.1)
        assert cluster.primary_named() == cluster.replica_port
        assert await redis.get("bunch:test:before") == "1"
        await redis.script_flush()  # whatever the new primary held, it must load what it lacks
        reply = await scripts.FORGET_CONSUMERS(redis, ["bunch:test:stream"], ["g", 1000, "c"])
        assert reply.done
    finally:
        await redis.aclose()
        for proc in cluster.processes.values():
            proc.kill()
