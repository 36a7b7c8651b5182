"""An export's settled objects counted in Redis a batch at a time, not one call per object.

A Redis call through redis-py costs the exporter's event loop about 0.3 ms of CPU, as much as the
rest of its work for an image (bench/exports.py); at a few hundred copies a second that is most of
what the exporter adds to a raw copy. Settlements wait up to LINGER_SECONDS (or until BATCH are
waiting) and go in one call of shared/lua/settle_export_objects.lua.

What waits is only progress: the copies are at the destination already. A packager that dies with
settlements waiting loses them, and the export, taken up again, finds those objects there (LIST,
then a HEAD with the same CRC-32) and settles them as skipped: each object is still counted once.
"""

import asyncio
import contextlib
import logging

from shared.scripts import Answer
from shared.stores.exports import ExportStatus, ExportStore, Outcome, Settlement

log = logging.getLogger(__name__)

LINGER_SECONDS = 0.1  # progress shows at most this late; the API's readers poll in seconds
BATCH = 256  # settlements per call, at most


class Settler:
    """One export run's settlements. `add` never waits; `close` counts whatever is still waiting."""

    def __init__(self, exports: ExportStore, export_id: str) -> None:
        self.exports = exports
        self.export_id = export_id
        self.outcomes = {outcome: 0 for outcome in Outcome}  # counted by this run
        self.ended = False  # the export was canceled, ended or purged: the run stops
        self.failure: Exception | None = None  # Redis refused a batch: the run stops, to be taken up again
        self._waiting: list[Settlement] = []
        self._full = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None

    def add(self, settlement: Settlement) -> None:
        self._waiting.append(settlement)
        if len(self._waiting) >= BATCH:
            self._full.set()
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush_soon())

    async def close(self) -> None:
        """Counts what waits; raises what made a batch fail (the export is then taken up again)."""
        if self._flushing is not None:
            self._full.set()
            await self._flushing
        await self._flush()
        if self.failure is not None:
            raise self.failure

    async def _flush_soon(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._full.wait(), LINGER_SECONDS)
        await self._flush()

    async def _flush(self) -> None:
        while self._waiting and self.failure is None:
            batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
            if len(self._waiting) < BATCH:
                self._full.clear()
            try:
                reply = await self.exports.settle(self.export_id, batch)
            except Exception as exc:  # Redis unreachable: raised by close(), which the run always reaches
                lost = len(batch) + len(self._waiting)
                log.warning("export %s: could not count %d objects: %s", self.export_id, lost, exc)
                self.failure = exc
                return
            if reply.answer == Answer.MISSING or (reply.values and reply.values[0] == ExportStatus.CANCELED):
                self.ended = True  # canceled, or purged
            if reply.answer == Answer.REFUSED:
                self.ended = True  # ended meanwhile: nothing lands in its counts any more
                continue
            for item, counted in zip(batch, reply.values[1:], strict=True):
                if int(counted):
                    self.outcomes[item.outcome] += 1
