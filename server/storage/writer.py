"""The batching writer of status reports.

Handlers hand each validated report to `ReportWriter.write`, which returns only once the
transaction holding it has committed. One task, holding its own connection, takes up to
`batch_size` queued reports (gathering them for up to `gather` while they keep arriving) and
stores them with one statement: the registration upserts and the new metric keys (each
passed as one jsonb array), the report rows (as arrays: storage/statistics.py), and the
invalidation of rollups that reports behind their watermark make stale. Ids of workers and
of report layouts are made once per process, before the first batch that needs them. A report that was answered 200 is therefore
stored; one that was not stored is answered 503 (the daemon retries).

Several such tasks (`connections`) take batches in turn, so that one batch is being built
and answered while another is in the database. A free task takes what is queued once
`gather` has passed since the last batch was taken, or as soon as GATHER_ENOUGH reports wait:
while reports keep arriving (a fleet at its rate, one report every few milliseconds) a
transaction stores several of them instead of each its own, which is most of what a report
costs PostgreSQL; a report after a quiet spell is taken at once; and clients that send as
fast as they are answered (each waiting for its answer) are never held back by the wait.
Under a saturating load the batches grow up to `batch_size`.
Concurrent batches lock registrations in the same (sorted) order and cannot deadlock.

The queue is bounded, and while the database is unreachable writes fail at once with 503
instead of queueing; the next write after `retry_delay` probes the database again.
"""

import asyncio
import collections
import logging
import struct
import time
from dataclasses import dataclass

import asyncpg
import orjson

from .. import errors
from ..errors import ApiError
from ..metrics import DATABASE_DOWN, NOT_STORED_IN_TIME, QUEUE_FULL, SHUTTING_DOWN, Metrics, count_database_error
from . import health, registrations, rollups, statistics
from .ids import Ids, layout_key, queue_metric
from .db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

WRITE_BATCH = f"""
WITH registrations AS ({registrations.REPORTS_UPSERT}),
     metric_keys AS ({statistics.METRIC_KEYS_UPSERT}),
     late_log AS ({rollups.LATE_REPORTS_LOG}),
{statistics.REPORTS}
"""

# A free writer task takes the queue at once when this many reports wait: a batch this large
# already costs PostgreSQL little per report, and waiting longer would only cap the rate of
# clients that each wait for their answer before sending again.
GATHER_ENOUGH = 32

# A metric key's last_reported is refreshed at most this often (seconds). The writer
# caches, per worker, when its keys were last written and which; the cache is forgotten
# when it grows past KNOWN_WORKERS_LIMIT workers.
METRIC_KEY_REFRESH = 3600.0
KNOWN_WORKERS_LIMIT = 200_000


@dataclass(slots=True)  # not frozen: a frozen dataclass is 4x slower to build, once per report
class Report:
    """A validated status report; serialised as is (orjson) into the batch statement."""

    company: str
    worker: str
    user_id: str
    ip: str | None
    timeout: int  # for a registration that the report creates
    time: float  # UNIX seconds
    task: str | None
    queue: str | None
    queues: list[str] | None
    tags: list[str] | None
    system_tags: list[str] | None
    metrics: dict  # {metric: {variant: value}}
    register: bool = True  # False (a bulk import of history): stored without touching the registration


_RETRY_LATER = {
    SHUTTING_DOWN: "server is shutting down, retry later",
    DATABASE_DOWN: "database temporarily unavailable, retry later",
    QUEUE_FULL: "too many reports waiting to be stored, retry later",
}


class ReportWriter:
    def __init__(
        self,
        dsn: str,
        *,
        connections: int = 2,
        batch_size: int = 500,
        gather: float = 0.01,
        queue_limit: int = 10_000,
        answer_timeout: float = 10.0,
        retry_delay: float = 1.0,
        metrics: Metrics | None = None,
        idle_gpu_percent: float = 5.0,
        utilisation_seconds: float = 600.0,
    ):
        self._dsn = dsn
        self._batch_size = batch_size
        self._gather = gather
        self._last_taken = time.monotonic()  # as if a batch had just been taken: the first reports gather too
        self._queue_limit = queue_limit
        self._answer_timeout = answer_timeout
        self._retry_delay = retry_delay
        self._queue: collections.deque[tuple[Report, asyncio.Future]] = collections.deque()
        self._wakeup = asyncio.Event()  # a report is queued (or closing)
        self._enough = asyncio.Event()  # GATHER_ENOUGH reports are queued (or closing)
        self._enough_reports = min(batch_size, GATHER_ENOUGH)
        self._connections: list[asyncpg.Connection | None] = [None] * connections
        self._unavailable_until = 0.0
        self._known_keys: dict[tuple[str, str], tuple[float, frozenset]] = {}
        self._ids = Ids()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._metrics = metrics
        self._idle_gpu_percent = idle_gpu_percent  # a GPU reported at or above this is busy
        self._utilisation_seconds = utilisation_seconds  # the time constant of the usage means

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(slot), name=f"report-writer-{slot}") for slot in range(len(self._connections))
        ]

    async def close(self) -> None:
        """Stop taking reports, store those already accepted, then disconnect."""
        self._closing = True
        self._wakeup.set()
        self._enough.set()
        await asyncio.gather(*self._tasks)
        for slot, connection in enumerate(self._connections):
            if connection is not None:
                await connection.close()
                self._connections[slot] = None

    async def write(self, report: Report) -> None:
        """Return once `report` is committed; raise 503 when it cannot be (now)."""
        refusal = self.refusal()
        if refusal is not None:
            raise self._refuse(refusal, _RETRY_LATER[refusal])
        loop = asyncio.get_running_loop()
        stored = loop.create_future()
        self._queue.append((report, stored))
        self._wakeup.set()
        if len(self._queue) >= self._enough_reports:
            self._enough.set()
        # Cheaper than asyncio.wait_for on the hot path: one timer, cancelled once stored.
        timer = loop.call_later(self._answer_timeout, self._expire, stored)
        try:
            await stored
        finally:
            timer.cancel()

    def refusal(self) -> str | None:
        """Why a report would be refused now (a cause of metrics.UNAVAILABLE_CAUSES), or None."""
        if self._closing:
            return SHUTTING_DOWN
        if time.monotonic() < self._unavailable_until:
            return DATABASE_DOWN
        if len(self._queue) >= self._queue_limit:
            return QUEUE_FULL
        return None

    def _refuse(self, cause: str, message: str, reports: int = 1) -> ApiError:
        if self._metrics is not None:
            self._metrics.reports_unavailable.labels(cause).inc(reports)
        return ApiError(errors.DATABASE_UNAVAILABLE, message)

    def _expire(self, stored: asyncio.Future) -> None:
        if not stored.done():
            stored.set_exception(
                self._refuse(NOT_STORED_IN_TIME, f"report not stored within {self._answer_timeout:g} s, retry later")
            )

    async def _run(self, slot: int) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._last_taken + self._gather - time.monotonic()
            if wait > 0 and len(self._queue) < self._enough_reports and not self._closing:
                self._enough.clear()
                try:
                    await asyncio.wait_for(self._enough.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue  # another task may have taken the batch meanwhile
            self._last_taken = time.monotonic()
            count = min(len(self._queue), self._batch_size)
            # A report already answered (timed out) is not stored: its sender will retry it.
            batch = [item for item in (self._queue.popleft() for _ in range(count)) if not item[1].done()]
            if self._metrics is not None:
                self._metrics.writer_queue.set(len(self._queue))
            if not batch:
                continue
            try:
                await self._store(slot, batch)
            except Exception as error:  # never let the writer die with reports waiting on it
                log.exception("report writer failed")
                _settle(batch, error)

    async def _store(self, slot: int, batch: list[tuple[Report, asyncio.Future]]) -> None:
        reports = [report for report, _ in batch]
        queues = [report_queues(report.queue, report.queues) for report in reports]
        layouts = [_layout(report.metrics, names) for report, names in zip(reports, queues)]
        started = time.perf_counter()
        try:
            connection = await self._connect(slot)
            await self._make_ids(connection, reports, layouts)
            parameters, written_keys = self._parameters(reports, layouts, queues)
            await connection.execute(WRITE_BATCH, *parameters, timeout=self._answer_timeout)
        except UNAVAILABLE_ERRORS as error:
            log.warning("database unavailable, %d reports answered 503: %r", len(batch), error)
            count_database_error(self._metrics, "unavailable")
            self._unavailable_until = time.monotonic() + self._retry_delay
            self._disconnect(slot)
            waiting = sum(not stored.done() for _, stored in batch)
            _settle(batch, self._refuse(DATABASE_DOWN, _RETRY_LATER[DATABASE_DOWN], waiting))
            return
        except asyncpg.PostgresError as error:
            count_database_error(self._metrics, "statement")
            if len(batch) == 1:
                _settle(batch, error)
                return
            # One bad report must not fail the others: store each alone.
            log.warning("batch of %d reports failed (%r); storing them one by one", len(batch), error)
            for item in batch:
                await self._store(slot, [item])
            return
        self._remember_keys(written_keys)
        _settle(batch, None)
        if self._metrics is not None:
            self._metrics.commit_seconds.observe(time.perf_counter() - started)
            self._metrics.batch_size.observe(len(batch))
            self._metrics.reports_stored.inc(len(batch))
    async def _make_ids(self, connection: asyncpg.Connection, reports: list[Report], layouts: list[tuple]) -> None:
        """Ids of the batch's workers and layouts that this process has not seen yet."""
        ids = self._ids
        workers = {(r.company, r.worker) for r in reports if ids.worker(r.company, r.worker) is None}
        shapes = {(r.company, key) for r, key in zip(reports, layouts) if ids.layout(r.company, key) is None}
        if workers or shapes:
            await ids.make(connection, workers, shapes)

    def _parameters(self, reports: list[Report], layouts: list[tuple], queues: list[tuple]) -> tuple[tuple, dict]:
        """WRITE_BATCH's parameters, and the metric keys they write (`queues`: each report's,
        `report_queues`)."""
        registrations: dict[tuple[str, str], dict] = {}
        metric_keys: dict[tuple[str, str, str], float] = {}
        written: dict[tuple[str, str], tuple[float, frozenset]] = {}  # metric keys, as cached
        busy_percent = self._idle_gpu_percent
        for report in reports:
            key = (report.company, report.worker)
            metrics = report.metrics
            entry = {
                "company": report.company,
                "worker": report.worker,
                "user_id": report.user_id,
                "ip": report.ip,
                "timeout": report.timeout,
                "task": report.task,
                "queue": report.queue,
                "queues": report.queues,
                "tags": report.tags,
                "system_tags": report.system_tags,
                "register": report.register,
                # The worker's earliest and latest report time in the batch: what the rollups'
                # invalidation log records when they fall behind the watermark.
                "low": report.time,
                "high": report.time,
                # Its health (storage/health.py): busy GPUs, mean CPU and GPU usage.
                "gpu_busy": health.gpu_busy(metrics.get("gpu_usage"), busy_percent),
                "cpu": health.mean(metrics.get("cpu_usage")),
                "gpu": health.mean(metrics.get("gpu_usage")),
                # What get_queues answers for now: its cores and memory (migrations/013).
                "cores": _cores(metrics.get("cpu_usage")),
                "memory": _memory(metrics),
            }
            earlier = registrations.get(key)
            if earlier is not None:
                # Lists a later report did not send keep what an earlier one in the batch sent.
                for name in ("queues", "tags", "system_tags", "cpu", "gpu", "cores", "memory"):
                    if entry[name] is None:
                        entry[name] = earlier[name]
                entry["gpu_busy"] = health.merge_gpu_busy(earlier["gpu_busy"], entry["gpu_busy"])
                entry["low"], entry["high"] = min(earlier["low"], report.time), max(earlier["high"], report.time)
                entry["register"] = entry["register"] or earlier["register"]
            registrations[key] = entry
            known = written.get(key) or self._known_keys.get(key)
            if known is None or report.time > known[0] + METRIC_KEY_REFRESH:
                written[key] = (report.time, frozenset(report.metrics))
                new_metrics = report.metrics.keys()
            elif not report.metrics.keys() <= known[1]:
                new_metrics = report.metrics.keys() - known[1]
                written[key] = (known[0], known[1].union(new_metrics))
            else:
                continue
            for metric in new_metrics:
                row = (report.company, report.worker, metric)
                metric_keys[row] = max(report.time, metric_keys.get(row, 0.0))
        values = [pack_values(report.metrics, names, bool(report.task)) for report, names in zip(reports, queues)]
        ids = self._ids
        parameters = (
            orjson.dumps([registrations[key] for key in sorted(registrations)]).decode(),
            orjson.dumps(
                [
                    {"company": company, "worker": worker, "metric": metric, "time": when}
                    for (company, worker, metric), when in sorted(metric_keys.items())
                ]
            ).decode(),
            [report.time for report in reports],
            [ids.worker(report.company, report.worker) for report in reports],
            [ids.layout(report.company, key) for report, key in zip(reports, layouts)],
            [report.task or None for report in reports],  # an empty task is no task (SPEC: activity)
            values,
            self._utilisation_seconds,
        )
        return parameters, written

    def _remember_keys(self, written: dict) -> None:
        if len(self._known_keys) + len(written) > KNOWN_WORKERS_LIMIT:
            self._known_keys.clear()
        self._known_keys.update(written)

    async def _connect(self, slot: int) -> asyncpg.Connection:
        connection = self._connections[slot]
        if connection is None or connection.is_closed():
            connection = self._connections[slot] = await asyncpg.connect(self._dsn, timeout=self._answer_timeout)
        return connection

    def _disconnect(self, slot: int) -> None:
        if self._connections[slot] is not None:
            self._connections[slot].terminate()
            self._connections[slot] = None


def report_queues(queue: str | None, queues: list[str] | None) -> tuple[str, ...]:
    """The queues a status report listened to: its `queues` and its `queue` (its own fields,
    not its registration's), each once, empty names left out (docs/queues.md)."""
    if not queues:
        return (queue,) if queue else ()
    names = dict.fromkeys(queues)
    if queue:
        names[queue] = None
    names.pop("", None)
    return tuple(names)


_TOTAL = ("total",)
# Each set of queues' part of a layout key, made once (a fleet names a few sets); forgotten
# when it grows past KNOWN_WORKERS_LIMIT sets.
_queue_layouts: dict[tuple[str, ...], tuple] = {}


def _layout(metrics: dict, queues: tuple[str, ...]) -> tuple:
    """The layout of a report's values: its metrics', then a queue pseudo-metric per queue."""
    key = layout_key(metrics)
    if not queues:
        return key
    part = _queue_layouts.get(queues)
    if part is None:
        if len(_queue_layouts) >= KNOWN_WORKERS_LIMIT:
            _queue_layouts.clear()
        part = _queue_layouts[queues] = tuple((queue_metric(queue), _TOTAL) for queue in queues)
    return key + part


def pack_values(metrics: dict, queues: tuple[str, ...] = (), busy: bool = False) -> bytes:
    """A report's values `{metric: {variant: value}}`, in order, then one per queue (1 when
    `busy`: the report carries a task, else 0), as 8-byte big-endian floats."""
    values = [value for variants in metrics.values() for value in variants.values()]
    values.extend([1.0 if busy else 0.0] * len(queues))
    return struct.pack(f">{len(values)}d", *values)


def _cores(usage: dict | None) -> int | None:
    """The cores of a report's `cpu_usage` list (None without one, or for a single number)."""
    return len(usage) if usage and "total" not in usage else None


def _memory(metrics: dict) -> float | None:
    """The machine's memory: used + free, as reported (None without both)."""
    used, free = metrics.get("memory_used"), metrics.get("memory_free")
    if used is None or free is None:
        return None
    return sum(used.values()) + sum(free.values())


def _settle(batch: list[tuple[Report, asyncio.Future]], error: BaseException | None) -> None:
    for _, stored in batch:
        if stored.done():
            continue
        if error is None:
            stored.set_result(None)
        else:
            stored.set_exception(error)
