"""Periodic work: the expiry sweep of registrations and the retention of statistics.

Every server process runs both. The sweep is one idempotent DELETE, so concurrent sweeps
are harmless; retention takes a transaction-scoped advisory lock so that one process at a
time drops chunks, and the others skip that round.
"""

import asyncio
import logging
from typing import Awaitable, Callable

import asyncpg

from .config import Settings
from .storage import registrations, statistics
from .storage.db import UNAVAILABLE_ERRORS

log = logging.getLogger(__name__)

RETENTION_LOCK = 0x574B5254  # an arbitrary advisory lock key


async def sweep_expired(pool: asyncpg.Pool) -> int:
    deleted = await registrations.delete_expired(pool)
    if deleted:
        log.info("expired %d worker registrations", deleted)
    return deleted


async def apply_retention(pool: asyncpg.Pool, days: float) -> int | None:
    """Drop statistics older than `days`; None when another process is doing it."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
            return None
        dropped = await statistics.drop_older_than(conn, days)
    if dropped:
        log.info("retention dropped %d statistics chunks older than %g days", dropped, days)
    return dropped


async def _every(seconds: float, job: Callable[[], Awaitable], name: str) -> None:
    while True:
        try:
            await job()
        except UNAVAILABLE_ERRORS as error:
            log.warning("%s skipped, database unavailable: %r", name, error)
        except Exception:
            log.exception("%s failed", name)
        await asyncio.sleep(seconds)


def start(pool: asyncpg.Pool, settings: Settings) -> list[asyncio.Task]:
    return [
        asyncio.create_task(
            _every(settings.expiry_sweep_seconds, lambda: sweep_expired(pool), "expiry sweep"),
            name="expiry-sweep",
        ),
        asyncio.create_task(
            _every(
                settings.retention_sweep_seconds,
                lambda: apply_retention(pool, settings.stats_retention_days),
                "statistics retention",
            ),
            name="statistics-retention",
        ),
    ]
