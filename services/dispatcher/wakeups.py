"""Wake the dispatcher as soon as a job is queued.

shared/lua/create.lua puts a new job in its project's queue and, in the same call, publishes the
project's name on `keys.JOBS_CHANNEL`. Each message sets the dispatcher's wake-up event, so the
job's first run is claimed at once instead of on the dispatcher's next idle poll.

The message carries no work: the job is in its queue before anyone hears of it. So Pub/Sub's
at-most-once delivery is enough. A message missed while this subscriber is away (connection lost,
Redis restarting) only delays that job until the dispatcher's next poll (`Dispatcher.run`'s
`idle_wait`), and each (re)subscription wakes the dispatcher once, which finds any job queued
while nobody listened. There is nothing to acknowledge, claim or trim, and no stream to read.
"""

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from services.dispatcher.backoff import backoff_delay
from shared import keys

log = logging.getLogger(__name__)


class JobWakeups:
    """Sets `wakeup` on each message of `channel`; re-subscribes with backoff after any failure."""

    def __init__(
        self,
        redis: Redis,
        wakeup: asyncio.Event,
        *,
        channel: str = keys.JOBS_CHANNEL,
        backoff_base: float = 0.5,
        backoff_cap: float = 5.0,
        read_timeout: float = 10.0,
    ) -> None:
        self.redis = redis
        self.wakeup = wakeup
        self.channel = channel
        self.backoff_base = backoff_base
        # Short: once Redis is back, so is the subscription within seconds (meanwhile jobs wait for a poll).
        self.backoff_cap = backoff_cap
        # Each read that times out lets redis-py send its health-check PING when one is due.
        self.read_timeout = read_timeout

    async def run(self, stop: asyncio.Event) -> None:
        # The read is cancelled rather than given a short timeout to notice `stop`: shutdown is not
        # delayed by up to a read, and an idle subscriber does not wake several times a second.
        listening = asyncio.create_task(self._listen(), name="job-wakeups")
        try:
            await stop.wait()
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening

    async def _listen(self) -> None:
        failures = 0  # attempts since the last confirmed subscription; 0: subscribed (or never failed)
        while True:
            # A PubSub takes a connection of its own out of the pool, and gives it back when closed.
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=self.read_timeout)
                    if message is None:  # read timeout or health-check answer
                        continue
                    if message["type"] == "subscribe":
                        # From here on every job is announced to us; one pass finds those queued
                        # before (while unsubscribed, whatever the poll has not yet picked up).
                        if failures:
                            log.info("subscribed to %s again (attempts that failed: %d)", self.channel, failures)
                        failures = 0
                    self.wakeup.set()
            except Exception as exc:
                # Connection lost, Redis restarting or refusing: never fatal, the poll still works.
                failures += 1
                if failures == 1:
                    log.warning(
                        "not subscribed to %s (%r); until it is back, new jobs wait for the dispatcher's poll",
                        self.channel,
                        exc,
                    )
            finally:
                await _close(pubsub)
            await asyncio.sleep(backoff_delay(failures, self.backoff_base, self.backoff_cap))


async def _close(pubsub: PubSub) -> None:
    # Closing a connection that is already broken can fail in turn; it is discarded either way.
    with contextlib.suppress(Exception):
        await pubsub.aclose()
