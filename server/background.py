"""Periodic work: the expiry sweep of registrations, the retention of statistics, the
refresh of the rollups, and re-reading the companies' limits.

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
from datetime import datetime, timezone
from typing import Awaitable, Callable

import asyncpg

from .config import Settings
from .limits import Limits
from .metrics import Metrics
from .storage import compaction, registrations, rollups, statistics
from .storage.compaction import CompactionResult
from .storage.refresh import Refresher, RefreshResult
from .storage.db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

RETENTION_LOCK = 0x574B5254  # an arbitrary advisory lock key


async def sweep_expired(pool: asyncpg.Pool, metrics: Metrics | None = None) -> int:
    """Delete expired registrations; count the live ones for the metrics."""
    deleted = await registrations.delete_expired(pool)
    if deleted:
        log.info("expired %d worker registrations", deleted)
    if metrics is not None:
        metrics.registered_workers.set(await registrations.count_live(pool))
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
    """Bring the rollups up to date and compact what can be, on a connection of its own: no
    statement timeout (after a long outage or a bulk import this may take minutes), no JIT
    (it costs more than it saves on these statements). None when another process or host
    holds the refresh lock. A `refresher` kept between calls remembers the open buckets."""
    refresher = refresher or Refresher(settings.retention, lag=settings.rollup_lag_seconds)
    conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", rollups.REFRESH_LOCK):
            return None
        try:
            steps = await refresher.refresh(conn)
            compacted = await compaction.compact(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", rollups.REFRESH_LOCK)
    finally:
        await conn.close()
    for step in steps:
        if step.invalidations or step.new_watermark - step.old_watermark > 600:
            watermark = datetime.fromtimestamp(step.new_watermark, timezone.utc).isoformat()
            log.info("rollups refreshed to %s: %d invalidations, %d regions", watermark, step.invalidations, step.regions)
    if compacted.hours or compacted.late:
        log.info("compacted %d hours of reports and %d late reports", compacted.hours, compacted.late)
    return steps, compacted


async def refresh_rollups_forever(settings: Settings) -> None:
    """The rollup refresher process that `serve` starts beside its server processes: a
    refresh and compaction every WORKERS_ROLLUP_REFRESH_SECONDS until its parent is gone."""
    parent = os.getppid()
    refresher = Refresher(settings.retention, lag=settings.rollup_lag_seconds)
    await _every(
        settings.rollup_refresh_seconds,
        lambda: refresh_rollups(settings.db_dsn, settings, refresher),
        "rollup refresh",
        while_=lambda: os.getppid() == parent,
    )


async def _every(
    seconds: float, job: Callable[[], Awaitable], name: str, *, while_: Callable[[], bool] = lambda: True
) -> None:
    while while_():
        try:
            await job()
        except UNAVAILABLE_ERRORS as error:
            log.warning("%s skipped, database unavailable: %r", name, error)
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(seconds)


def start(pool: asyncpg.Pool, settings: Settings, metrics: Metrics | None, limits: Limits) -> list[asyncio.Task]:
    return [
        asyncio.create_task(
            _every(settings.limits_refresh_seconds, lambda: limits.refresh(pool), "limits refresh"),
            name="limits-refresh",
        ),
        asyncio.create_task(
            _every(settings.expiry_sweep_seconds, lambda: sweep_expired(pool, metrics), "expiry sweep"),
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
