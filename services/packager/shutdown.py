"""The packager's shutdown: ZIPs under way get a grace period, then give up cleanly.

A ZIP of a large job takes minutes; a rollout's SIGTERM should neither wait for it without bound
(the pod is killed at its grace period, mid-upload, its parts left stored) nor throw away a ZIP
that is nearly done. So each ZIP has `packager_shutdown_grace_seconds` to finish; past that its
writer stops at the next chunk, minio aborts the multipart upload, and the job's message stays
pending for another replica (or this one, restarted), which writes the ZIP from the start.
"""

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class ZipWriters:
    """The ZIPs this process is writing (from the message that asks for one on), and the signal that
    makes their writer threads give up."""

    def __init__(self) -> None:
        self.active = 0  # changed on the event loop only
        self._idle = asyncio.Event()
        self._idle.set()
        self.abandon = threading.Event()  # read by the writer threads

    @contextmanager
    def writing(self) -> Iterator[threading.Event]:
        self.active += 1
        self._idle.clear()
        try:
            yield self.abandon
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def wind_down(self, stop: asyncio.Event, grace_seconds: float) -> None:
        """A service loop: once `stop` is set, wait for the ZIPs under way, at most the grace."""
        await stop.wait()
        try:
            await asyncio.wait_for(self._idle.wait(), grace_seconds)
        except TimeoutError:
            log.warning("abandoning %d ZIP(s) after a shutdown grace of %gs", self.active, grace_seconds)
        # Set in any case: a ZIP that starts now (a message read just before the stop) gives up at once.
        self.abandon.set()
