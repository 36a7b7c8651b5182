"""BUNCH_REDIS_URL with TLS, on real processes: a primary, a replica and three Sentinels that listen
with TLS only (certificates of a throwaway CA, deploy/redis_ha.py), reached with a
`rediss+sentinel://` URL and BUNCH_REDIS_TLS_CA_FILE; a client without the CA, or without TLS, is
told what is wrong; and a failover happens (and is followed) with TLS on.

The cluster is the module's: the failover test, last, takes its primary away."""

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from deploy.processes import scratch_dir
from deploy.redis_ha import RedisHA, TlsFiles, make_test_certificates, start_redis_ha
from shared.errors import Misconfigured, Unavailable
from shared.redis_connection import check, connect
from shared.settings import Settings
from tests.test_redis_connection import problem_of

pytestmark = pytest.mark.timeout(60)

PASSWORD = "primary-password"
SENTINEL_PASSWORD = "sentinel-password"


@pytest.fixture(scope="module")
def tls_dir() -> Iterator[Path]:
    path = scratch_dir("bunch-tls-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def tls(tls_dir: Path) -> TlsFiles:
    return make_test_certificates(tls_dir / "certs")


@pytest.fixture(scope="module")
def ha(tls_dir: Path, tls: TlsFiles) -> Iterator[RedisHA]:
    cluster = start_redis_ha(tls_dir / "ha", password=PASSWORD, sentinel_password=SENTINEL_PASSWORD, tls=tls)
    yield cluster
    for proc in cluster.processes.values():
        proc.kill()


def settings_for(url: str, ca_file: Path | None) -> Settings:
    return Settings(
        redis_url=url,
        redis_sentinel_password=SENTINEL_PASSWORD,
        redis_tls_ca_file=str(ca_file) if ca_file else None,
    )


@pytest.fixture
async def client(ha: RedisHA, tls: TlsFiles) -> AsyncIterator[Redis]:
    redis = connect(settings_for(ha.url, tls.ca))
    yield redis
    await redis.aclose()


async def test_a_tls_sentinel_url_with_the_ca_reaches_the_primary(ha: RedisHA, tls: TlsFiles, client: Redis) -> None:
    assert ha.url.startswith("rediss+sentinel://")
    await check(client)
    await client.set("bunch:test:tls", "1")
    assert await client.get("bunch:test:tls") == "1"
    assert (await client.execute_command("ROLE"))[0] == "master"
    assert await client.config_get("port") == {"port": "0"}  # TLS only: no plain port at all
    assert await client.execute_command("WAIT", 1, 5000) == 1  # replicated, over TLS
    replica = Redis.from_url(ha.node_url(ha.replica_port), ssl_ca_certs=str(tls.ca), decode_responses=True)
    try:
        assert await replica.get("bunch:test:tls") == "1"
    finally:
        await replica.aclose()


async def test_a_tls_url_of_one_server_works_with_the_ca(ha: RedisHA, tls: TlsFiles) -> None:
    url = ha.node_url(ha.primary_port)
    assert url.startswith("rediss://")
    redis = connect(settings_for(url, tls.ca))
    try:
        await check(redis)
    finally:
        await redis.aclose()


async def test_without_the_ca_the_certificate_problem_is_named(ha: RedisHA) -> None:
    # The system's trust store does not know the test CA.
    for url in (ha.url, ha.node_url(ha.primary_port)):
        problem = await problem_of(settings_for(url, None))
        assert PASSWORD not in problem.message and SENTINEL_PASSWORD not in problem.message
        # Waiting would not help: the settings must change.
        assert isinstance(problem, Misconfigured), (url, problem.message)
        assert "does not trust" in problem.message and "BUNCH_REDIS_TLS_CA_FILE" in problem.message, problem.message


async def test_a_plain_url_against_tls_only_sentinels_is_refused(ha: RedisHA, tls: TlsFiles) -> None:
    plain = ha.url.replace("rediss+sentinel://", "redis+sentinel://")
    problem = await problem_of(settings_for(plain, tls.ca))
    # A TLS port drops a client that speaks plain RESP: to it, no Sentinel answers.
    assert isinstance(problem, Unavailable), problem.message
    assert "no Sentinel is reachable" in problem.message, problem.message
    for port in ha.sentinel_ports:
        assert f"127.0.0.1:{port}" in problem.message, problem.message


async def test_a_failover_with_tls_is_followed(ha: RedisHA, tls: TlsFiles, client: Redis) -> None:
    # Last in the module: the cluster loses its primary.
    await client.set("bunch:test:before", "1")
    assert await client.execute_command("WAIT", 1, 5000) == 1  # on the replica before the primary goes
    ha.processes["redis"].kill()
    killed = time.monotonic()
    while True:
        try:
            await client.set("bunch:test:after", "1")
            break
        except Exception:
            assert time.monotonic() - killed < 30, "no new primary within 30 s"
            await asyncio.sleep(0.1)
    # The Sentinels (asked over TLS) name the replica, and the client wrote to it.
    assert await asyncio.to_thread(ha.wait_primary, ha.replica_port, 5.0) >= 0
    assert client.connection_pool.master_address == ("127.0.0.1", ha.replica_port)
    assert await client.get("bunch:test:before") == "1"
    assert await client.get("bunch:test:after") == "1"
