"""The consumer-group loop every service runs.

Each message is handled at least once: it is acknowledged only after its handler returned, and
messages left pending by a consumer that died are claimed by another one (XAUTOCLAIM). Handlers
are idempotent, so the effect of a message happens once. What every group has acknowledged is
trimmed away, so a stream holds only the messages still at work.
"""

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import keys, scripts
from shared.redis_connection import REDIS_DOWN
from shared.settings import Settings

log = logging.getLogger(__name__)

Fields = dict[str, str]
Handler = Callable[[Fields], Coroutine[Any, Any, None]]


def consumer_name(settings: Settings, service: str) -> str:
    return settings.consumer_name or f"{service}-{socket.gethostname()}-{os.getpid()}"


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class StreamConsumer:
    def __init__(
        self,
        redis: Redis,
        stream: str,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        batch: int = 50,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 10,
        heartbeat: bool = False,
        forget_idle_ms: int | None = None,
        concurrency: int = 1,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.heartbeat = heartbeat
        # Messages of one read handled at once: for handlers that wait on I/O per message and do
        # not depend on each other's order.
        self.concurrency = concurrency
        # Far beyond a live consumer's idle time (one blocking read), so only the departed qualify.
        self.forget_idle_ms = forget_idle_ms or max(10 * claim_idle_ms, 300_000)
        # Handled but not yet acknowledged: the XACK rides along with the next read. Until then a
        # crash only redelivers them, and handlers are idempotent.
        self._handled: list[str] = []

    async def run(self, stop: asyncio.Event) -> None:
        claim_every = max(self.claim_idle_ms / 1000 / 2, 0.5)
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        ready = False
        while not stop.is_set():
            try:
                if not ready:
                    await ensure_group(self.redis, self.stream, self.group)
                    # A restarted replica keeps its name: finish what it held before it died.
                    await self._handle_own_pending()
                    ready = True
                if loop.time() >= next_claim:
                    await self._claim_abandoned()
                    await self._forget_departed()
                    await self.trim_acknowledged()
                    next_claim = loop.time() + claim_every
                for _stream, messages in await self._acknowledge_and_read() or []:
                    await self._handle_all(messages)
            except REDIS_DOWN as exc:
                log.warning("redis unavailable on %s (%s); retrying", self.stream, exc)
                ready = False
                await asyncio.sleep(1.0)
        try:
            if self._handled:
                await self.redis.xack(self.stream, self.group, *self._handled)
        except REDIS_DOWN as exc:
            log.warning("could not acknowledge %d handled messages on %s (%s)", len(self._handled), self.stream, exc)

    async def _acknowledge_and_read(self) -> Any:
        """XACK what was handled and XREADGROUP the next messages, in one round trip."""
        read = {"count": self.batch, "block": self.block_ms}
        if not self._handled:
            return await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, **read)
        handled = list(self._handled)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, self.group, *handled)
            pipe.xreadgroup(self.group, self.consumer, {self.stream: ">"}, **read)
            _, response = await pipe.execute()
        del self._handled[: len(handled)]
        return response

    async def _handle_own_pending(self) -> None:
        after = "0"
        while True:
            response = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: after}, count=self.batch)
            messages = [m for _stream, batch in response or [] for m in batch]
            if not messages:
                return
            after = messages[-1][0]  # failures stay pending; move on past them
            await self._handle_all(await self._without_poison(messages))

    async def _claim_abandoned(self) -> None:
        start = "0-0"
        while True:
            start, messages, *_ = await self.redis.xautoclaim(
                self.stream, self.group, self.consumer, self.claim_idle_ms, start, count=self.batch
            )
            if messages:
                await self._handle_all(await self._without_poison(messages))
            if start == "0-0" or not messages:
                return

    async def _forget_departed(self) -> None:
        args = [self.group, self.forget_idle_ms, self.consumer]
        (forgotten,) = (await scripts.FORGET_CONSUMERS(self.redis, [self.stream], args)).values
        if forgotten:
            log.info("forgot %d departed consumers of %s: %s", len(forgotten), self.stream, forgotten)

    async def trim_acknowledged(self) -> int:
        """Trim what every group of the stream has acknowledged; returns the entries trimmed."""
        (trimmed,) = (await scripts.TRIM_ACKNOWLEDGED(self.redis, [self.stream])).values
        return int(trimmed)

    async def _without_poison(self, messages: list[tuple[str, Fields]]) -> list[tuple[str, Fields]]:
        """Move messages that keep failing to the dead-letter stream instead of retrying forever."""
        kept = []
        for message_id, fields in messages:
            pending = await self.redis.xpending_range(self.stream, self.group, message_id, message_id, 1)
            if pending and pending[0]["times_delivered"] > self.max_deliveries:
                log.error("giving up on %s %s after %s deliveries", self.stream, message_id, self.max_deliveries)
                # One transaction: a crash in between would leave it both dead-lettered and pending.
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.xadd(keys.DEAD_LETTERS_STREAM, {"stream": self.stream, **(fields or {})})
                    pipe.xack(self.stream, self.group, message_id)
                    await pipe.execute()
            elif fields is not None:  # None: the entry was trimmed away while pending
                kept.append((message_id, fields))
        return kept

    async def _handle_all(self, messages: list[tuple[str, Fields]]) -> None:
        if self.concurrency == 1:
            for message_id, fields in messages:
                await self._handle_one(message_id, fields)
            return
        slots = asyncio.Semaphore(self.concurrency)

        async def one(message_id: str, fields: Fields) -> None:
            async with slots:
                await self._handle_one(message_id, fields)

        outcomes = await asyncio.gather(*(one(*message) for message in messages), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # Redis is down: the rest stay pending and come again

    async def _handle_one(self, message_id: str, fields: Fields) -> None:
        try:
            if self.heartbeat:
                await self._handle_with_heartbeat(message_id, fields)
            else:
                await self.handler(fields)
        except (RedisConnectionError, RedisTimeoutError):
            raise
        except Exception:
            # Left pending: another delivery (after claim_idle_ms) tries again.
            log.exception("handler failed for %s %s", self.stream, message_id)
            return
        if self.heartbeat:
            # Long work: acknowledged at once, or it would idle unclaimed behind the next one.
            await self.redis.xack(self.stream, self.group, message_id)
        else:
            self._handled.append(message_id)

    async def _handle_with_heartbeat(self, message_id: str, fields: Fields) -> None:
        """Keep re-claiming a long-running message so live work is never taken over as abandoned."""
        work = asyncio.create_task(self.handler(fields))
        interval = self.claim_idle_ms / 1000 / 3
        while True:
            done, _ = await asyncio.wait({work}, timeout=interval)
            if done:
                return work.result()
            try:
                await self.redis.xclaim(self.stream, self.group, self.consumer, 0, [message_id], justid=True)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # The work goes on (and the next beat tries again): giving up on it here would have
                # the message handled again beside it once Redis is back, the same work twice at once.
                log.warning("could not renew the claim on %s %s (%s)", self.stream, message_id, exc)
