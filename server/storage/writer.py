"""The batching writer of status reports.

Handlers hand each validated report to `ReportWriter.write`, which returns only once the
transaction holding it has committed. One task, holding its own connection, takes up to
`batch_size` queued reports (waiting `max_delay` for more when fewer are queued) and
stores them with one statement: the registration upserts, the new metric keys and the
report rows, all read from one JSON document by the database. A report that was answered
200 is therefore stored; one that was not stored is answered 503 (the daemon retries).

The queue is bounded, and while the database is unreachable writes fail at once with 503
instead of queueing; the next write after `retry_delay` probes the database again.
"""

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import asyncpg
import orjson

from .. import errors
from ..errors import ApiError
from . import registrations, statistics
from .db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

WRITE_BATCH = f"""
WITH registrations AS ({registrations.REPORTS_UPSERT}),
     metric_keys AS ({statistics.METRIC_KEYS_UPSERT})
{statistics.REPORTS_INSERT}
"""

# A metric key's last_reported is refreshed at most this often (seconds); the cache of
# keys already written is forgotten when it grows past KNOWN_KEYS_LIMIT entries.
METRIC_KEY_REFRESH = 3600.0
KNOWN_KEYS_LIMIT = 1_000_000


@dataclass(frozen=True)
class Report:
    company: str
    worker: str
    user: str
    ip: str | None
    timeout: int  # for a registration that the report creates
    time: float  # UNIX seconds
    task: str | None
    queue: str | None
    queues: list[str] | None
    tags: list[str] | None
    system_tags: list[str] | None
    metrics: dict  # {metric: {variant: value}}


def _unavailable(message: str) -> ApiError:
    return ApiError(errors.DATABASE_UNAVAILABLE, message)


class ReportWriter:
    def __init__(
        self,
        dsn: str,
        *,
        batch_size: int = 500,
        max_delay: float = 0.005,
        queue_limit: int = 10_000,
        answer_timeout: float = 10.0,
        retry_delay: float = 1.0,
    ):
        self._dsn = dsn
        self._batch_size = batch_size
        self._max_delay = max_delay
        self._queue_limit = queue_limit
        self._answer_timeout = answer_timeout
        self._retry_delay = retry_delay
        self._queue: collections.deque[tuple[Report, asyncio.Future]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._connection: asyncpg.Connection | None = None
        self._unavailable_until = 0.0
        self._known_keys: dict[tuple[str, str, str], float] = {}
        self._closing = False
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="report-writer")

    async def close(self) -> None:
        """Stop taking reports, store those already accepted, then disconnect."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def write(self, report: Report) -> None:
        """Return once `report` is committed; raise 503 when it cannot be (now)."""
        if self._closing:
            raise _unavailable("server is shutting down, retry later")
        if time.monotonic() < self._unavailable_until:
            raise _unavailable("database temporarily unavailable, retry later")
        if len(self._queue) >= self._queue_limit:
            raise _unavailable("too many reports waiting to be stored, retry later")
        loop = asyncio.get_running_loop()
        stored = loop.create_future()
        self._queue.append((report, stored))
        self._wakeup.set()
        # Cheaper than asyncio.wait_for on the hot path: one timer, cancelled once stored.
        timer = loop.call_later(self._answer_timeout, _expire, stored, self._answer_timeout)
        try:
            await stored
        finally:
            timer.cancel()

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._queue) < self._batch_size and self._max_delay > 0 and not self._closing:
                await asyncio.sleep(self._max_delay)
            count = min(len(self._queue), self._batch_size)
            # A report already answered (timed out) is not stored: its sender will retry it.
            batch = [item for item in (self._queue.popleft() for _ in range(count)) if not item[1].done()]
            if not batch:
                continue
            try:
                await self._store(batch)
            except Exception as error:  # never let the writer die with reports waiting on it
                log.exception("report writer failed")
                _settle(batch, error)

    async def _store(self, batch: list[tuple[Report, asyncio.Future]]) -> None:
        reports = [report for report, _ in batch]
        document, new_keys = self._document(reports)
        try:
            connection = await self._connect()
            await connection.execute(WRITE_BATCH, document, timeout=self._answer_timeout)
        except UNAVAILABLE_ERRORS as error:
            log.warning("database unavailable, %d reports answered 503: %r", len(batch), error)
            self._unavailable_until = time.monotonic() + self._retry_delay
            await self._disconnect()
            _settle(batch, _unavailable("database temporarily unavailable, retry later"))
            return
        except asyncpg.PostgresError as error:
            if len(batch) == 1:
                _settle(batch, error)
                return
            # One bad report must not fail the others: store each alone.
            log.warning("batch of %d reports failed (%r); storing them one by one", len(batch), error)
            for item in batch:
                await self._store([item])
            return
        self._remember_keys(new_keys)
        _settle(batch, None)

    def _document(self, reports: list[Report]) -> tuple[str, dict]:
        """The JSON document that WRITE_BATCH reads, and the metric keys it writes."""
        registrations_by_worker: dict[tuple[str, str], dict] = {}
        new_keys: dict[tuple[str, str, str], float] = {}
        rows = []
        for report in reports:
            key = (report.company, report.worker)
            earlier = registrations_by_worker.get(key)
            registrations_by_worker[key] = {
                "company": report.company,
                "worker": report.worker,
                "user_id": report.user,
                "ip": report.ip,
                "timeout": report.timeout,
                "task": report.task,
                "queue": report.queue,
                # Lists a later report did not send keep what an earlier one in the batch sent.
                "queues": report.queues if report.queues is not None or not earlier else earlier["queues"],
                "tags": report.tags if report.tags is not None or not earlier else earlier["tags"],
                "system_tags": (
                    report.system_tags if report.system_tags is not None or not earlier else earlier["system_tags"]
                ),
            }
            rows.append(
                {
                    "time": report.time,
                    "company": report.company,
                    "worker": report.worker,
                    "task": report.task,
                    "metrics": report.metrics,
                }
            )
            for metric in report.metrics:
                metric_key = (report.company, report.worker, metric)
                written = self._known_keys.get(metric_key)
                if written is None or report.time > written + METRIC_KEY_REFRESH:
                    new_keys[metric_key] = max(report.time, new_keys.get(metric_key, 0.0))
        document = {
            "registrations": [registrations_by_worker[key] for key in sorted(registrations_by_worker)],
            "metric_keys": [
                {"company": company, "worker": worker, "metric": metric, "time": when}
                for (company, worker, metric), when in sorted(new_keys.items())
            ],
            "reports": rows,
        }
        return orjson.dumps(document).decode(), new_keys

    def _remember_keys(self, new_keys: dict) -> None:
        if len(self._known_keys) + len(new_keys) > KNOWN_KEYS_LIMIT:
            self._known_keys.clear()
        self._known_keys.update(new_keys)

    async def _connect(self) -> asyncpg.Connection:
        if self._connection is None or self._connection.is_closed():
            self._connection = await asyncpg.connect(self._dsn, timeout=self._answer_timeout)
        return self._connection

    async def _disconnect(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None


def _expire(stored: asyncio.Future, after: float) -> None:
    if not stored.done():
        stored.set_exception(_unavailable(f"report not stored within {after:g} s, retry later"))


def _settle(batch: list[tuple[Report, asyncio.Future]], error: BaseException | None) -> None:
    for _, stored in batch:
        if stored.done():
            continue
        if error is None:
            stored.set_result(None)
        else:
            stored.set_exception(error)
