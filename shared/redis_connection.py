"""Connections to Redis, the state of record: one server, or a primary that Redis Sentinel watches.

`settings.redis_url` names either:

    redis://[[user]:password@]host:6379/0        rediss:// for TLS, unix:///path?db=0
    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/<master-name>[/<db>]
    rediss+sentinel://...                         TLS to the Sentinels and to the primary

The password of a Sentinel URL is the primary's; the Sentinels' own (their `requirepass`) is
`settings.redis_sentinel_password`. Sentinel URLs follow the form of the issue that asked for them
and of Kombu's `sentinel://` transport: one URL, the Sentinels comma-separated.

After a failover the next connection asks the Sentinels for the primary again (redis-py's
SentinelConnectionPool), and a connection to a demoted primary fails with READONLY, which redis-py
turns into a ConnectionError. Every loop of the services already retries a call that failed that
way, so each reaches the new primary by itself; scripts the new primary does not know are loaded
again on first use (shared/scripts.py). TCP keepalive finds a primary that vanished without closing
its connections (a lost node) in about half a minute instead of the kernel's two hours.
"""

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any, TypeVar, overload
from urllib.parse import unquote, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import Misconfigured, Unavailable
from shared.settings import Settings

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Redis)

# What a call raises while Redis restarts or fails over: worth a warning and a retry, not a traceback.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme: TLS
# Commands to Sentinels are short reads: an unreachable one is skipped for the next this soon.
SENTINEL_TIMEOUT_SECONDS = 2.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Idle 15 s, then 3 probes 5 s apart: a vanished peer is noticed within 30 s.
_KEEPALIVE = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """Where a Sentinel URL points: the Sentinels, the master name they know the primary by."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelAddress | None:
    """The address of a `redis+sentinel://` URL; None for any other URL. Raises Misconfigured."""
    scheme, _, rest = url.partition("://")
    if scheme not in SENTINEL_SCHEMES:
        return None
    parts = urlsplit(f"redis://{rest}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    sentinels = tuple(_host_port(host) for host in hosts.split(",") if host)
    if not sentinels:
        raise Misconfigured(f"BUNCH_REDIS_URL names no Sentinel: {redact(url)}")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise Misconfigured(f"BUNCH_REDIS_URL must end in /<master-name>[/<db>]: {redact(url)}")
    if len(path) == 2 and not path[1].isdigit():
        raise Misconfigured(f"BUNCH_REDIS_URL's database must be a number, not {path[1]!r}")
    return SentinelAddress(
        sentinels=sentinels,
        master=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        tls=SENTINEL_SCHEMES[scheme],
    )


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    port = port or "26379"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Misconfigured(f"BUNCH_REDIS_URL names a Sentinel as {text!r}: give host:port")
    return host, int(port)


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, hosts = rest.partition("@")
    if not at:
        return url
    username = credentials.partition(":")[0]
    return f"{scheme}{sep}{username}:***@{hosts}"


class _CheckOutsideLock:
    """redis-py 5's pool checks a connection for stray data while holding the pool's lock, and that
    check waits for one turn of the event loop: under many concurrent commands (a gateway at 200
    requests in flight) every checkout queues behind the previous one. The check runs here after
    the lock is released, as redis-py 6 and later do; the connection is already this caller's."""

    _lock: asyncio.Lock

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> AbstractConnection:
        async with self._lock:
            connection = self.get_available_connection()  # type: ignore[attr-defined]
        try:
            await self.ensure_connection(connection)  # type: ignore[attr-defined]
        except BaseException:
            await self.release(connection)  # type: ignore[attr-defined]
            raise
        return connection


class _Pool(_CheckOutsideLock, ConnectionPool):
    pass


class _SentinelPool(_CheckOutsideLock, SentinelConnectionPool):
    pass


def _tls(settings: Settings) -> dict[str, Any]:
    return {"ssl_ca_certs": settings.redis_tls_ca_file} if settings.redis_tls_ca_file else {}


@overload
def connect(settings: Settings) -> Redis: ...
@overload
def connect(settings: Settings, *, client_class: type[R], decode_responses: bool = True) -> R: ...
def connect(settings: Settings, *, client_class: type[Redis] = Redis, decode_responses: bool = True) -> Redis:
    """A client of the primary, reconnecting by itself (to a new primary after a failover);
    `client_class` a subclass of Redis (arq's ArqRedis, which reads bytes)."""
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "health_check_interval": 15,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "socket_keepalive": True,
        "socket_keepalive_options": _KEEPALIVE,
        # Only connects time out (no socket_timeout): a write is never sent twice by a retry.
        "retry_on_timeout": True,
    }
    address = parse_sentinel_url(settings.redis_url)
    if address is None:
        tls = _tls(settings) if settings.redis_url.startswith("rediss://") else {}
        pool = _Pool.from_url(settings.redis_url, **options, **tls)
        return client_class.from_pool(pool)  # the client owns the pool: aclose() closes both
    tls = {"ssl": True, **_tls(settings)} if address.tls else {}
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
        "socket_timeout": SENTINEL_TIMEOUT_SECONDS,  # reads only: nothing is written to a Sentinel
        "password": settings.redis_sentinel_password.get_secret_value() or None,
        **tls,
    }
    sentinel = Sentinel(
        address.sentinels,
        sentinel_kwargs=sentinel_options,
        db=address.db,
        username=address.username,
        password=address.password,
        **options,
        **tls,
    )
    client: Redis = sentinel.master_for(address.master, redis_class=client_class, connection_pool_class=_SentinelPool)
    return client


async def check(redis: Redis) -> None:
    """Nothing when Redis answers as the state of record; otherwise raises Misconfigured (the
    settings cannot work: a wrong password, a master no Sentinel knows) or Unavailable (nothing
    answers now; it may later), each with a message that names the problem."""
    pool = redis.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        await _check_sentinels(pool)
    try:
        await asyncio.wait_for(redis.ping(), CONNECT_TIMEOUT_SECONDS * 2)
    except AuthenticationError as exc:
        raise Misconfigured(f"Redis {_where(redis)} refused the credentials of BUNCH_REDIS_URL: {exc}") from None
    except ResponseError as exc:
        raise Misconfigured(f"Redis {_where(redis)} refused the connection's settings: {exc}") from None
    except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
        _refuse_untrusted(exc, f"Redis {_where(redis)}")
        raise Unavailable(f"Redis {_where(redis)} does not answer: {exc or type(exc).__name__}") from None


def _refuse_untrusted(exc: BaseException, who: str) -> None:
    """A certificate that does not verify will not start to: that is the settings, not an outage."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise Misconfigured(
                f"{who} presents a certificate this service does not trust ({cause.verify_message}): "
                "set BUNCH_REDIS_TLS_CA_FILE to the CA that signed it"
            ) from None
        cause = cause.__cause__ or cause.__context__


async def _check_sentinels(pool: SentinelConnectionPool) -> None:
    master: str = pool.service_name
    answers: list[str] = []
    known = False
    for sentinel in pool.sentinel_manager.sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        where = f"{kwargs['host']}:{kwargs['port']}"
        try:
            address = await sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", master)
        except AuthenticationError as exc:
            raise Misconfigured(
                f"the Sentinel at {where} refused the password of BUNCH_REDIS_SENTINEL_PASSWORD: {exc}"
            ) from None
        except ResponseError as exc:
            raise Misconfigured(f"{where} in BUNCH_REDIS_URL does not answer as a Sentinel: {exc}") from None
        except REDIS_DOWN as exc:
            _refuse_untrusted(exc, f"the Sentinel at {where}")
            answers.append(f"{where}: {exc or type(exc).__name__}")
            continue
        if address:
            known = True
            break
        answers.append(f"{where}: knows no master {master!r}")
    if known:
        return
    if all("knows no master" in answer for answer in answers):
        raise Misconfigured(f"no Sentinel monitors a master named {master!r} ({'; '.join(answers)})")
    if any("knows no master" in answer for answer in answers):
        raise Misconfigured(f"the Sentinels that answer monitor no master named {master!r} ({'; '.join(answers)})")
    raise Unavailable(f"no Sentinel is reachable ({'; '.join(answers)})")


def _where(redis: Redis) -> str:
    pool = redis.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        address = pool.master_address
        return f"primary {pool.service_name!r}" + (f" at {address[0]}:{address[1]}" if address else "")
    kwargs = pool.connection_kwargs
    return f"at {kwargs['path']}" if "path" in kwargs else f"at {kwargs.get('host')}:{kwargs.get('port')}"


async def explain(redis: Redis) -> str:
    """Why `redis` failed a call, in words (after the failure)."""
    try:
        await check(redis)
    except (Misconfigured, Unavailable) as exc:
        return exc.message
    return "a call failed, but Redis answers now"


async def refuse_misconfigured(settings: Settings) -> None:
    """Raise Misconfigured when `settings` cannot reach Redis however long one waits; a Redis that
    does not answer yet is only logged."""
    redis = connect(settings)
    try:
        await check(redis)
    except Unavailable as exc:
        log.warning("Redis does not answer yet: %s", exc.message)
    finally:
        await redis.aclose()


async def wait_until_usable(redis: Redis, *, report_every: float = 10.0) -> None:
    """Return once Redis answers. While it does not, say why every `report_every` s (not a
    traceback per retry); a problem of the settings raises Misconfigured at once."""
    loop = asyncio.get_running_loop()
    next_report = 0.0
    while True:
        try:
            await check(redis)
            return
        except Unavailable as exc:
            if loop.time() >= next_report:
                log.warning("waiting for Redis: %s", exc.message)
                next_report = loop.time() + report_every
        await asyncio.sleep(1.0)
