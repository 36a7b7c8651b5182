"""What checking a dataset's images may cost the gateway, and where that work runs.

Reading (inflating) and decoding images is the expensive part of accepting a dataset: a 117 KB PNG
can hold 40 megapixels, a ZIP can list it many times. Each request has a `Budget` (decoded pixels,
charged from an image's header before it is decoded, and CPU seconds), and all of it runs in one
small pool of threads per process (`run_blocking`), one job per project at a time, the project that
has used the least CPU first, at a lower CPU priority: however many dataset uploads arrive at once,
they share `dataset_decode_threads` cores and never the event loop, the other projects' requests
keep the rest of the machine, and another project's dataset waits for one decode, not for a queue.
"""

import asyncio
import contextlib
import heapq
import itertools
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

from shared.errors import TooLarge

T = TypeVar("T")

# Added to the pool threads' nice value: under contention the scheduler gives them about a tenth of
# what a thread serving another request gets, and they still use idle cores fully.
NICENESS = 10
MEGAPIXEL = 1_000_000


class OverBudget(TooLarge):
    """A dataset costs more to check than a request may spend; nothing is stored."""


class Budget:
    """One request's allowance. Its jobs run one at a time (`run_blocking`), so no lock is needed."""

    def __init__(self, max_pixels: int, cpu_seconds: float) -> None:
        self.max_pixels = max_pixels
        self.cpu_seconds = cpu_seconds
        self.pixels = 0
        self.cpu = 0.0

    def charge_pixels(self, width: int, height: int) -> None:
        """Called with an image's size before it is decoded: refusing then costs no decoding."""
        if self.pixels + width * height > self.max_pixels:
            raise OverBudget(
                f"The dataset's images have more than {self.max_pixels // MEGAPIXEL:,} megapixels in all, the "
                "limit per dataset; nothing was stored. Send fewer or smaller images."
            )
        self.pixels += width * height

    def charge_cpu(self, seconds: float) -> None:
        self.cpu += seconds
        if self.cpu > self.cpu_seconds:
            raise OverBudget(
                f"Checking the dataset's images took more than {self.cpu_seconds:g} CPU seconds, the limit per "
                "dataset; nothing was stored. Send fewer or smaller images."
            )


def _lower_priority() -> None:
    # Linux keeps a nice value per thread (setpriority on a thread id); elsewhere this may fail or
    # apply to the whole process, which is why it is tried only here, in the pool's own threads.
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICENESS))


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="dataset-decode", initializer=_lower_priority)


class _Lane:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Turns:
    """Which job the pool runs next (one per event loop: asyncio objects belong to one).

    A project has one job in line at a time: its uploads wait in its lane, one behind the other. A
    freed thread goes to the project in line that has used the least CPU, counted from `floor` (the
    usage of the job that started last), so a project idle for a while has no credit saved up. One
    small dataset sent while another project decodes a hundred large images waits for one decode.
    """

    def __init__(self, threads: int) -> None:
        self.free = threads
        self.used: dict[str, float] = {}
        self.floor = 0.0
        self.waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self.order = itertools.count()
        self.lanes: dict[str, _Lane] = {}

    @contextlib.asynccontextmanager
    async def lane(self, project: str) -> AsyncIterator[None]:
        lane = self.lanes.setdefault(project, _Lane())
        lane.users += 1
        try:
            async with lane.lock:
                yield
        finally:
            lane.users -= 1
            if lane.users == 0:
                del self.lanes[project]
                if self.used.get(project, 0.0) <= self.floor:
                    self.used.pop(project, None)  # it would start from the floor anyway

    async def acquire(self, project: str) -> None:
        used = self.used[project] = max(self.used.get(project, 0.0), self.floor)
        if self.free > 0 and not self.waiting:
            self.free -= 1
            self.floor = max(self.floor, used)
            return
        turn = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (used, next(self.order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._hand_on()  # given the thread just as it was cancelled: the next one takes it
            raise

    def release(self, project: str, cpu: float) -> None:
        self.used[project] = self.used.get(project, self.floor) + cpu
        # Handed on after the releasing request has run on: when it has more to do, its next job is
        # in line by then, and a request of small jobs keeps its turn instead of losing it each time.
        asyncio.get_running_loop().call_soon(self._hand_on)

    def _hand_on(self) -> None:
        while self.waiting:
            used, _, turn = heapq.heappop(self.waiting)
            if not turn.done():  # a cancelled waiter is skipped
                self.floor = max(self.floor, used)
                turn.set_result(None)
                return
        self.free += 1


_turns: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Turns]]" = weakref.WeakKeyDictionary()


async def run_blocking(project: str, threads: int, budget: Budget | None, work: Callable[[], T]) -> T:
    """Run `work` in the process's dataset pool (`threads` wide) when it is `project`'s turn; its
    CPU time counts for the project's turns and is charged to `budget`, which raises OverBudget
    once it is spent, after the job that spent it."""
    turns = _turns.setdefault(asyncio.get_running_loop(), {}).setdefault(threads, _Turns(threads))
    spent = 0.0

    def timed() -> T:
        nonlocal spent
        started = time.thread_time()
        try:
            return work()
        finally:
            spent = time.thread_time() - started

    try:
        async with turns.lane(project):
            await turns.acquire(project)
            try:
                result = await asyncio.get_running_loop().run_in_executor(_pool(threads), timed)
            finally:
                turns.release(project, spent)
    except Exception:
        if budget is not None:
            budget.charge_cpu(spent)
        raise
    if budget is not None:
        budget.charge_cpu(spent)
    return result
