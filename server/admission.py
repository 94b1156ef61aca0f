"""Admission of heavy reads: a few at a time per server process, companies taking turns.

A read that finds no free slot waits in its company's queue; when a slot frees, the company
that has waited since longest without a turn goes next, so one company's dashboards cannot
keep another company's reads waiting behind all of theirs. A company with `per_company`
reads already waiting is answered 429 at once; a read that waits `wait_seconds` is answered
503 (the client asks again after the Retry-After). Status reports never pass through here.
"""

import asyncio
import contextlib
import time
from collections import deque

from . import errors
from .errors import ApiError

RETRY_AFTER_SECONDS = 2

QUEUE_FULL = "company_queue_full"
WAITED_TOO_LONG = "waited_too_long"
REFUSAL_CAUSES = (QUEUE_FULL, WAITED_TOO_LONG)


class ReadAdmission:
    def __init__(self, slots: int, wait_seconds: float, per_company: int, metrics=None):
        self._free = slots
        self._wait_seconds = wait_seconds
        self._per_company = per_company
        self._metrics = metrics
        # Companies with reads waiting, in turn order (a dict keeps insertion order).
        self._waiting: dict[str, deque[asyncio.Future]] = {}

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    @contextlib.asynccontextmanager
    async def admitted(self, company: str):
        await self._acquire(company)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, company: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        queue = self._waiting.get(company)
        if queue is not None and len(queue) >= self._per_company:
            self._refuse(QUEUE_FULL)
            raise ApiError(
                errors.TOO_MANY_READS,
                f"Too many reads waiting: {len(queue)} of this company's reads are queued "
                "(WORKERS_READ_QUEUE_PER_COMPANY); retry later",
                retry_after=RETRY_AFTER_SECONDS,
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(company, deque()).append(turn)
        began = time.perf_counter()
        self._count_waiting(+1)
        try:
            async with asyncio.timeout(self._wait_seconds):
                await asyncio.shield(turn)
        except BaseException as error:
            if turn.done():  # the slot came as the wait ended: pass it on
                self._release()
            else:
                turn.cancel()
                self._forget(company, turn)
            if isinstance(error, TimeoutError):
                self._refuse(WAITED_TOO_LONG)
                raise ApiError(
                    errors.READS_BUSY,
                    f"Server busy with other reads: this read waited {self._wait_seconds:g} s for its turn "
                    "(WORKERS_READ_QUEUE_SECONDS); retry later",
                    retry_after=RETRY_AFTER_SECONDS,
                ) from None
            raise
        finally:
            self._count_waiting(-1)
            if self._metrics is not None:
                self._metrics.read_wait_seconds.observe(time.perf_counter() - began)

    def _release(self) -> None:
        """Hand the slot to the next company's first waiting read, or free it."""
        while self._waiting:
            company, queue = next(iter(self._waiting.items()))
            turn = queue.popleft()
            del self._waiting[company]
            if queue:
                self._waiting[company] = queue  # to the back of the line
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1

    def _forget(self, company: str, turn: asyncio.Future) -> None:
        queue = self._waiting.get(company)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[company]

    def _count_waiting(self, change: int) -> None:
        if self._metrics is not None:
            self._metrics.reads_waiting.inc(change)

    def _refuse(self, cause: str) -> None:
        if self._metrics is not None:
            self._metrics.reads_refused.labels(cause).inc()
