"""Limits that keep one daemon or one company from exhausting the service (docs/limits.md).

- Per status report (400/12): metric keys, values per metric and values per report, checked
  by `report_schema` (schemas.MachineStats) before anything else happens.
- Per company (429 with Retry-After): live registered workers, distinct metric keys and
  reports per second, each the setting's default or the company's override (table
  `company_limits`, `python -m server companies set`), read again by every process every
  WORKERS_LIMITS_REFRESH_SECONDS.
- Per get_stats (400/16): worker ids, items, and buckets x series.

The ingest path pays a dict lookup and some arithmetic per report: a token bucket, and the
workers and metric keys this process has already seen of the company. Only what is new to
the process reaches the database: a worker not seen here for KNOWN_WORKER_SECONDS is looked
up, and a worker or metric key new to its company is admitted in one transaction under the
company's advisory lock (counted, then recorded: the registration, the key), so that the
worker and key limits hold across processes and hosts.

The token bucket is per process: with N server processes (WORKERS_PROCESSES) each one
holds 1/N of the company's rate and burst. The kernel spreads connections evenly over the
processes, so a fleet of daemons gets the whole rate; one connection alone gets 1/N of it.
"""

import asyncio
import math
import time
from dataclasses import dataclass

import asyncpg

from . import errors, schemas
from .config import Settings
from .errors import ApiError
from .storage import limits as overrides_storage
from .storage import registrations, statistics
from .storage.registrations import WorkerFilter
from .storage.writer import Report

# A worker whose report this process saw this recently is live: its registration has not
# expired (timeouts are longer than this) and needs no lookup. Registrations with a shorter
# timeout, and workers unregistered through another process, may be re-registered by their
# next report within this time without being counted against the limit.
KNOWN_WORKER_SECONDS = 60.0
# A report beyond its company's rate is answered 429 this much later: a client that sends
# again at once, ignoring Retry-After, then costs one request per connection and second
# instead of as many as the server can refuse (measured: bench/run.sh --fairness). The
# honest daemon waits Retry-After after it anyway.
REFUSAL_HOLD_SECONDS = 1.0
# Retry-After of a refused new worker or metric key: room appears when a worker unregisters
# or expires, or a metric key leaves retention, not within a second.
QUOTA_RETRY_AFTER = 60


@dataclass(frozen=True)
class CompanyLimits:
    """One company's limits, its overrides applied; 0 is no limit."""

    workers: int
    metric_keys: int
    reports_per_second: float
    burst: float  # reports


def company_limits(settings: Settings, override: asyncpg.Record | None) -> CompanyLimits:
    def value(name: str, default):
        return default if override is None or override[name] is None else override[name]

    rate = value("reports_per_second", settings.company_reports_per_second)
    return CompanyLimits(
        workers=value("workers", settings.company_max_workers),
        metric_keys=value("metric_keys", settings.company_max_metric_keys),
        reports_per_second=rate,
        burst=value("burst", rate * settings.company_report_burst_seconds),
    )


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second up to `capacity`; a report takes one. Rate 0: no limit."""

    rate: float
    capacity: float
    tokens: float
    updated: float  # time.monotonic() of the last take

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until there is one."""
        if not self.rate:
            return 0.0
        tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if tokens >= 1:
            self.tokens = tokens - 1
            return 0.0
        self.tokens = tokens
        return (1 - tokens) / self.rate


@dataclass(slots=True)
class CompanyState:
    """What this process knows of one company."""

    limits: CompanyLimits
    bucket: TokenBucket
    workers: dict[str, float]  # worker -> time.monotonic() its last report was admitted here
    metric_keys: set[str] | None  # the company's metric keys (None: not read yet)


def report_schema(settings: Settings) -> schemas.StatusReportRequest:
    """The status report schema with the per-report limits of these settings."""
    return schemas.bounded_status_report_request(
        schemas.ReportLimits(
            metric_keys=settings.max_metric_keys_per_report,
            values_per_metric=settings.max_values_per_metric,
            values_per_report=settings.max_values_per_report,
        )
    )


class Limits:
    """The per-company limits of one server process, and the status report schema."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._overrides: dict[str, asyncpg.Record] = {}
        self._companies: dict[str, CompanyState] = {}
        self.report_schema = report_schema(settings)

    async def refresh(self, db) -> None:
        """Read the overrides again (every process, every WORKERS_LIMITS_REFRESH_SECONDS)."""
        self._overrides = await overrides_storage.overrides(db)
        stale = time.monotonic() - KNOWN_WORKER_SECONDS
        for company, state in self._companies.items():
            limits = company_limits(self._settings, self._overrides.get(company))
            if limits != state.limits:
                state.limits = limits
                state.bucket.rate, state.bucket.capacity = self._per_process(limits)
                state.bucket.tokens = min(state.bucket.tokens, state.bucket.capacity)
            state.workers = {worker: seen for worker, seen in state.workers.items() if seen > stale}

    def _per_process(self, limits: CompanyLimits) -> tuple[float, float]:
        """This process's share of the company's rate and burst."""
        processes = max(1, self._settings.processes)
        return limits.reports_per_second / processes, max(1.0, limits.burst / processes)

    def _company(self, company: str) -> CompanyState:
        state = self._companies.get(company)
        if state is None:
            limits = company_limits(self._settings, self._overrides.get(company))
            rate, capacity = self._per_process(limits)
            bucket = TokenBucket(rate, capacity, tokens=capacity, updated=time.monotonic())
            state = self._companies[company] = CompanyState(limits, bucket, workers={}, metric_keys=None)
        return state

    # --------------------------------------------------------------- status reports

    async def admit_report(self, pool: asyncpg.Pool, report: Report) -> None:
        """Raise 429 when a valid report is beyond its company's rate, or brings a worker or
        metric keys beyond its limits; a new worker or key admitted is recorded."""
        state = self._company(report.company)
        now = time.monotonic()
        wait = state.bucket.take(now)
        if wait:
            await asyncio.sleep(REFUSAL_HOLD_SECONDS)
            raise ApiError(
                errors.TOO_MANY_REPORTS,
                f"Too many reports: the company's limit is {state.limits.reports_per_second:g} reports per second "
                f"(WORKERS_COMPANY_REPORTS_PER_SECOND or the company's override), retry later",
                retry_after=math.ceil(wait),
            )
        seen = state.workers.get(report.worker)
        new_worker = bool(state.limits.workers) and (seen is None or now - seen > KNOWN_WORKER_SECONDS)
        new_keys = bool(state.limits.metric_keys) and (
            state.metric_keys is None or not report.metrics.keys() <= state.metric_keys
        )
        if new_worker or new_keys:
            await self._admit_new(pool, state, report, new_worker, new_keys)
        state.workers[report.worker] = now

    async def _admit_new(
        self, pool: asyncpg.Pool, state: CompanyState, report: Report, new_worker: bool, new_keys: bool
    ) -> None:
        """What is new to this process: a worker not registered, or metric keys new to the
        company, is counted and recorded under the company's lock (429 beyond its limit)."""
        company, worker = report.company, report.worker
        if new_worker and await registrations.is_registered(pool, company, worker):
            new_worker = False
        if new_keys and state.metric_keys is None:
            state.metric_keys = set(await statistics.metric_keys(pool, company, []))
        if new_keys and report.metrics.keys() <= state.metric_keys:
            new_keys = False
        if not (new_worker or new_keys):
            return
        async with pool.acquire() as conn, conn.transaction():
            await overrides_storage.lock_company(conn, company)
            if new_worker and not await registrations.is_registered(conn, company, worker):
                await _room_for_worker(conn, state.limits, company, worker)
                await registrations.register(
                    conn, company, worker, user=report.user_id, ip=report.ip, timeout=report.timeout,
                    queues=report.queues, tags=report.tags, system_tags=report.system_tags,
                )  # fmt: skip
            if new_keys:
                known = set(await statistics.metric_keys(conn, company, []))
                unknown = report.metrics.keys() - known
                if unknown:
                    _room_for_keys(state.limits, len(known), len(unknown))
                    await statistics.add_metric_keys(conn, company, worker, sorted(unknown), report.time)
        if new_keys:
            state.metric_keys = known | unknown

    # --------------------------------------------------------------- registrations

    async def register(self, pool: asyncpg.Pool, company: str, worker: str, **registration) -> None:
        """workers.register: a worker not live yet must have room within the company's limit."""
        state = self._company(company)
        async with pool.acquire() as conn, conn.transaction():
            await overrides_storage.lock_company(conn, company)
            if state.limits.workers and not await registrations.is_registered(conn, company, worker):
                await _room_for_worker(conn, state.limits, company, worker)
            await registrations.register(conn, company, worker, **registration)
        state.workers[worker] = time.monotonic()

    def forget(self, company: str, worker: str) -> None:
        """workers.unregister: the worker's next report is looked up (and counted) again."""
        state = self._companies.get(company)
        if state is not None:
            state.workers.pop(worker, None)


async def _room_for_worker(conn, limits: CompanyLimits, company: str, worker: str) -> None:
    live = await registrations.count(conn, company, WorkerFilter())
    if live >= limits.workers:
        raise ApiError(
            errors.TOO_MANY_WORKERS,
            f"Too many workers: the company has {live} live workers, its limit is {limits.workers} "
            f"(WORKERS_COMPANY_MAX_WORKERS or the company's override); {worker} is not registered",
            retry_after=QUOTA_RETRY_AFTER,
        )


def _room_for_keys(limits: CompanyLimits, known: int, new: int) -> None:
    if known + new > limits.metric_keys:
        raise ApiError(
            errors.TOO_MANY_METRIC_KEYS,
            f"Too many metric keys: the company has {known} distinct metric keys and this report adds {new}, "
            f"its limit is {limits.metric_keys} (WORKERS_COMPANY_MAX_METRIC_KEYS or the company's override)",
            retry_after=QUOTA_RETRY_AFTER,
        )


# ------------------------------------------------------------------- reads


def check_count(count: int, limit: int, field: str, setting: str) -> None:
    """400/16 when a request's `field` holds more than `limit` (0: no limit) entries."""
    if limit and count > limit:
        raise ApiError(
            errors.INVALID_FIELD_VALUES,
            f"Invalid field values: {field} has {count} entries, more than the limit of {limit} ({setting})",
        )


def check_series_buckets(settings: Settings, series: int, buckets: int) -> None:
    """400/16 when a chart's answer would hold more than WORKERS_MAX_STATS_SERIES_BUCKETS values per aggregation."""
    limit = settings.max_stats_series_buckets
    if limit and series * buckets > limit:
        raise ApiError(
            errors.INVALID_FIELD_VALUES,
            f"Invalid field values: {series} series x {buckets} buckets is more than the limit of {limit} "
            "(WORKERS_MAX_STATS_SERIES_BUCKETS): ask for fewer workers or metrics, a larger interval or a shorter range",
        )
