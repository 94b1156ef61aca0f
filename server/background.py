"""Periodic work: the expiry sweep of registrations and runtime properties, the retention of statistics, the
refresh of the rollups, re-reading the companies' limits, and watching the event loop's lag.

Every server process runs the sweep, retention and the limits' refresh (server/limits.py).
The sweep is one idempotent DELETE, so concurrent sweeps are harmless; retention takes an
advisory lock so that one process (or host) at a time drops chunks, and the others skip
that round. The rollups' refresh and compaction run in a process of its own
(`refresh_rollups_forever`, started by `python -m server serve` at a lower CPU priority):
rolling up and packing are CPU work that can wait while the server is busy taking reports
(reads stay exact meanwhile), and they take an advisory lock too.
"""

import asyncio
import logging
import os
import time
from datetime import datetime, timezone
from typing import Awaitable, Callable

import asyncpg

from .config import Settings
from .limits import Limits
from .metrics import Metrics, set_health
from .storage import compaction, registrations, rollups, runtime_properties, statistics
from .storage.compaction import CompactionResult
from .storage.refresh import Refresher, RefreshResult
from .storage.db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

RETENTION_LOCK = 0x574B5254  # an arbitrary advisory lock key
REFRESHER_NAME = "workers-rollup-refresher"  # its connections' application_name (pg_stat_activity)
WATERMARK_MARGIN = 0.5  # seconds after the watermark can move that the refresher looks
LAG_SAMPLE_SECONDS = 0.1


async def sweep_expired(
    pool: asyncpg.Pool, metrics: Metrics | None = None, health: registrations.HealthRules = registrations.HealthRules()
) -> int:
    """Delete expired registrations and runtime properties; count the live registrations,
    the silent ones and the idle GPUs for the metrics. Returns the registrations deleted."""
    deleted = await registrations.delete_expired(pool)
    if deleted:
        log.info("expired %d worker registrations", deleted)
    properties = await runtime_properties.delete_expired(pool)
    if properties:
        log.info("expired %d runtime properties", properties)
    if metrics is not None:
        set_health(metrics, await registrations.health_counts(pool, health))
    return deleted


async def apply_retention(pool: asyncpg.Pool, retention: rollups.Retention) -> int | None:
    """Drop the chunks of every tier past its retention; None when another process is doing it."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
            return None
        longest = max(retention.raw_days, *retention.tier_days.values())
        dropped = await statistics.drop_older_than(conn, retention.raw_days, longest)
        dropped += await rollups.drop_older_than(conn, retention)
    if dropped:
        log.info("retention dropped %d statistics chunks", dropped)
    return dropped


async def refresh_rollups(
    dsn: str, settings: Settings, refresher: Refresher | None = None
) -> tuple[list[RefreshResult], CompactionResult] | None:
    """Bring the rollups up to date and compact what can be, on a connection of its own
    (`connect_refresher`). None when another process or host holds the refresh lock."""
    conn = await connect_refresher(dsn)
    try:
        return await refresh_rollups_on(conn, settings, refresher)
    finally:
        await conn.close()


async def connect_refresher(dsn: str) -> asyncpg.Connection:
    """A connection for the refresh: no statement timeout (after a long outage or a bulk
    import a pass may take minutes), no JIT (it costs more than it saves on these statements)."""
    return await asyncpg.connect(dsn, server_settings={"jit": "off", "application_name": REFRESHER_NAME})


async def refresh_rollups_on(
    conn: asyncpg.Connection, settings: Settings, refresher: Refresher | None = None, *, always_compact: bool = True
) -> tuple[list[RefreshResult], CompactionResult] | None:
    """`refresh_rollups` on `conn`. A `refresher` kept between calls remembers the open buckets.
    Without `always_compact`, compaction runs only after a pass that moved the rollups or took
    late reports: nothing else gives it anything new to pack or merge."""
    refresher = refresher or Refresher(settings.retention, lag=settings.rollup_lag_seconds)
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", rollups.REFRESH_LOCK):
        return None
    try:
        steps = await refresher.refresh(conn)
        moved = any(step.new_watermark > step.old_watermark or step.invalidations for step in steps)
        compacted = await compaction.compact(conn) if always_compact or moved else CompactionResult()
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", rollups.REFRESH_LOCK)
    for step in steps:
        if step.invalidations or step.new_watermark - step.old_watermark > 600:
            watermark = datetime.fromtimestamp(step.new_watermark, timezone.utc).isoformat()
            log.info("rollups refreshed to %s: %d invalidations, %d regions", watermark, step.invalidations, step.regions)
    if compacted.hours or compacted.late:
        log.info("compacted %d hours of reports and %d late reports", compacted.hours, compacted.late)
    return steps, compacted


def next_refresh_delay(now: float, every: float, lag: float) -> float:
    """Seconds until the next pass: at most `every`, and no later than when the watermark
    can move (a minute closes `lag` seconds ago), so that the rollups trail real time by
    `lag` to `lag` + 60 seconds, not by up to `every` more."""
    watermark_moves = (now - lag) // 60 * 60 + 60 + lag + WATERMARK_MARGIN
    return max(0.0, min(every, watermark_moves - now))


async def refresh_rollups_forever(settings: Settings) -> None:
    """The rollup refresher process that `serve` starts beside its server processes: a
    refresh and compaction at least every WORKERS_ROLLUP_REFRESH_SECONDS, and as soon as a
    minute can be rolled up, until its parent is gone. Its connection is kept between passes
    (a new one costs PostgreSQL a backend and its caches), and made again after a failure."""
    parent = os.getppid()
    refresher = Refresher(settings.retention, lag=settings.rollup_lag_seconds)
    conn: asyncpg.Connection | None = None

    async def one_pass() -> None:
        nonlocal conn
        try:
            if conn is None or conn.is_closed():
                conn = await connect_refresher(settings.db_dsn)
            await refresh_rollups_on(conn, settings, refresher, always_compact=False)
        except BaseException:
            if conn is not None:
                conn.terminate()  # its session, and any advisory lock, go with it
                conn = None
            raise

    await _every(
        lambda: next_refresh_delay(time.time(), settings.rollup_refresh_seconds, settings.rollup_lag_seconds),
        one_pass,
        "rollup refresh",
        while_=lambda: os.getppid() == parent,
    )


async def _every(
    seconds: float | Callable[[], float], job: Callable[[], Awaitable], name: str, *, while_: Callable[[], bool] = lambda: True
) -> None:
    """Run `job` until `while_()` is false, `seconds` (or what it returns) apart; a failure is
    logged and the next run goes on."""
    while while_():
        try:
            await job()
        except UNAVAILABLE_ERRORS as error:
            log.warning("%s skipped, database unavailable: %r", name, error)
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(seconds() if callable(seconds) else seconds)


async def watch_event_loop(metrics: Metrics) -> None:
    """Observe, every LAG_SAMPLE_SECONDS, how late the event loop wakes a timer: the time
    something held the loop (a status report arriving then waits as long)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_SAMPLE_SECONDS
        await asyncio.sleep(LAG_SAMPLE_SECONDS)
        metrics.event_loop_lag.observe(max(0.0, loop.time() - due))


def start(pool: asyncpg.Pool, settings: Settings, metrics: Metrics | None, limits: Limits) -> list[asyncio.Task]:
    watchers = [] if metrics is None else [asyncio.create_task(watch_event_loop(metrics), name="event-loop-lag")]
    return watchers + [
        asyncio.create_task(
            _every(settings.limits_refresh_seconds, lambda: limits.refresh(pool), "limits refresh"),
            name="limits-refresh",
        ),
        asyncio.create_task(
            _every(
                settings.expiry_sweep_seconds, lambda: sweep_expired(pool, metrics, settings.health), "expiry sweep"
            ),
            name="expiry-sweep",
        ),
        asyncio.create_task(
            _every(
                settings.retention_sweep_seconds,
                lambda: apply_retention(pool, settings.retention),
                "statistics retention",
            ),
            name="statistics-retention",
        ),
    ]
